"""Processes: who trains which rows, and how the prompt gradients meet.

A runtime tells the training loop its ``rank``, ``world_size`` and ``device``, sums tensors over
processes, and waits for the others. Training is data parallel: every process holds the frozen
base and the same prompts, takes its shard of each global batch (``schedule.shard``), and only the
prompts' gradients (a few kilobytes) plus two loss scalars are all-reduced once per step. The base
is never wrapped or synchronised. Logging, evaluation and checkpoint writing happen on the main
process; the others wait.

- :class:`LocalRuntime`: one process.
- :class:`AccelerateRuntime`: under ``accelerate launch`` (Hugging Face Accelerate sets up the
  process group: NCCL on GPUs, gloo on CPUs).

Not here: the loop (train.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError


class LocalRuntime:
    """One process, no communication."""

    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place."""

    def barrier(self) -> None:
        """Wait for every process."""

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order."""
        return [value]

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        return value

    def check_same(self, value: str, what: str, path: Path | str) -> None:
        """Raise :class:`ConfigError` on every process if they disagree on ``value``
        (e.g. which checkpoint they resume from)."""
        values = self.gather(value)
        if len(set(values)) > 1:
            seen = "; ".join(f"process {r}: {v}" for r, v in enumerate(values))
            raise ConfigError(f"--resume: the processes see different {what}s at {path} ({seen}); "
                              "is the run directory on a file system all processes share?")


class AccelerateRuntime(LocalRuntime):
    """Data parallel under ``accelerate launch`` (or torchrun): one process per GPU, or several CPU
    processes with the gloo backend."""

    def __init__(self, device: str | None = None):
        from accelerate import PartialState

        cpu = device == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu)
        self.world_size = self.state.num_processes
        self.rank = self.state.process_index
        self.is_main = self.state.is_main_process
        dev = torch.device(self.state.device)
        self.device = torch.device("cpu") if dev.type == "cpu" else dev

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.world_size == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])  # one collective per step
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
"""Environment flags ``accelerate launch`` sets for configs softprompt does not run (see README)."""


def check_launch_config() -> None:
    """Refuse accelerate configs that shard the model (FSDP, DeepSpeed): softprompt replicates the
    frozen base on every process and all-reduces only the prompt gradients."""
    for var, name in SHARDING_ENV.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"the accelerate config asks for {name}, which softprompt train does not run: it trains data "
                "parallel with the frozen base replicated on every process (only the prompt gradients are "
                "all-reduced). For a base too large for one GPU use --dtype bfloat16, --gradient-checkpointing, "
                "--device-map auto (one process) or --quantize 4bit; see README, Distributed training")


def runtime_from_env(device: str | None = None) -> LocalRuntime | None:
    """The runtime this process was started for: Accelerate's when launched with several
    processes, else None (the training loop then runs alone)."""
    check_launch_config()
    if not launched():
        return None
    try:
        return AccelerateRuntime(device)
    except ImportError as e:
        raise ConfigError("multi-process training needs Hugging Face Accelerate: pip install 'softprompt[distributed]'") from e


def accelerate_precision() -> str | None:
    """``--precision`` from ``accelerate launch --mixed_precision`` / the accelerate config
    (bf16, fp16), or None when it says "no" or nothing (then softprompt's own default holds)."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    return mp if mp in ("bf16", "fp16") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(train_args: Sequence[str], num_processes: int | None = None,
                   port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``softprompt train TRAIN_ARGS`` (pure
    apart from picking a free port). Without ``num_processes`` the accelerate config decides."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
        if num_processes > 1:
            # "multi_gpu" is accelerate's torchrun launcher; on a machine without GPUs the
            # processes join a gloo group (AccelerateRuntime passes cpu=True).
            cmd += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
    return cmd + ["-m", "softprompt", "train", *train_args]


def relaunch(train_args: Sequence[str], num_processes: int | None = None) -> int:
    """``softprompt train --launcher accelerate ...``: run the same command under accelerate."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("--launcher accelerate needs Hugging Face Accelerate: pip install 'softprompt[distributed]'")
    proc = subprocess.run(launch_command(train_args, num_processes))
    return 0 if proc.returncode == 0 else 2
