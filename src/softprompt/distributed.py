"""Processes: who trains which rows, and how the prompt gradients meet.

A runtime tells the training loop its ``rank``, ``world_size`` and ``device``, sums tensors over
processes, gathers shards, and waits for the others. Training is data parallel: every process
holds the same prompts, takes its shard of each global batch (``schedule.shard``), and only the
prompts' gradients (a few kilobytes) plus two loss scalars are all-reduced once per step. The
frozen base is replicated on every process, or, with an accelerate FSDP config
(:func:`fsdp_config`), sharded over them (sharding.py). Logging, checkpoint writing and (with a
replicated base) evaluation happen on the main process; the others wait.

- :class:`LocalRuntime`: one process.
- :class:`AccelerateRuntime`: under ``accelerate launch`` (Hugging Face Accelerate sets up the
  process group: NCCL on GPUs, gloo on CPUs).

Not here: the loop (train.py), how the base is sharded (sharding.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError
from .sharding import ShardingConfig


class LocalRuntime:
    """One process, no communication."""

    world_size = 1
    rank = 0
    is_main = True

    sharding: ShardingConfig | None = None
    """Set when the launch config asks for FSDP: the frozen base is sharded (sharding.py)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place."""

    def all_gather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        """Write every process's ``shard`` (n,) into ``out`` (W * n,), in rank order."""
        out.copy_(shard)

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

    def all_gather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        if self.world_size == 1:
            out.copy_(shard)
            return
        import torch.distributed as dist

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, shard)

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


TRUE = ("1", "true", "yes")


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in TRUE


def _off(value: str) -> bool:
    return value.lower() not in TRUE


FSDP_SETTINGS: dict[str, tuple[Callable[[str], bool], str]] = {
    "FSDP_RESHARD_AFTER_FORWARD": (lambda v: v.lower() in ("", "true", "1", "full_shard"),
                                   "fsdp_reshard_after_forward must be true (FULL_SHARD): each layer is freed "
                                   "after its forward, else the whole base stays gathered through the step"),
    "FSDP_SHARDING_STRATEGY": (lambda v: v.upper() in ("", "FULL_SHARD", "1"),
                               "fsdp_sharding_strategy must be FULL_SHARD: the base is frozen, so only its "
                               "weights can be sharded (no gradients or optimizer state)"),
    "FSDP_OFFLOAD_PARAMS": (_off, "fsdp_offload_params (CPU offload) is not supported; set it to false"),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": (_off, "fsdp_cpu_ram_efficient_loading is not supported (every process "
                                             "reads the checkpoint, then keeps its shard); set it to false"),
    "FSDP_ACTIVATION_CHECKPOINTING": (_off, "fsdp_activation_checkpointing is not supported with a sharded base; "
                                            "set it to false"),
    "FSDP_AUTO_WRAP_POLICY": (lambda v: v.upper() in ("", "TRANSFORMER_BASED_WRAP"),
                              "fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP: softprompt shards one "
                              "decoder layer per unit"),
    "FSDP_IGNORED_MODULES": (lambda v: not v, "fsdp_ignored_modules is not supported"),
}
"""The accelerate FSDP settings softprompt checks: env var -> (accepted?, why not). The others
(fsdp_version 1 or 2, prefetch, state dict type, use_orig_params, sync_module_states,
min_num_params) make no difference to how softprompt shards the base."""


def fsdp_config() -> ShardingConfig | None:
    """The sharding an ``accelerate launch`` FSDP config asks for (None without one).

    Raises:
        ConfigError: for DeepSpeed, and for FSDP settings softprompt does not honour (one line).
    """
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "the accelerate config asks for DeepSpeed, which softprompt train does not run; to shard a frozen base "
            "too large for one GPU use an FSDP config (configs/accelerate/fsdp.yaml), or --dtype bfloat16, "
            "--device-map auto (one process) or --quantize 4bit; see README, Distributed training")
    if not _env_true("ACCELERATE_USE_FSDP"):
        return None
    for var, (ok, why) in FSDP_SETTINGS.items():
        if not ok(os.environ.get(var, "").strip()):
            raise ConfigError(f"accelerate FSDP config: {why} (got {var}={os.environ.get(var)!r})")
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return ShardingConfig(layer_classes=classes)


def runtime_from_env(device: str | None = None) -> LocalRuntime | None:
    """The runtime this process was started for: Accelerate's when launched with several
    processes (its ``sharding`` set by an FSDP config), else None (the training loop then runs
    alone, unsharded)."""
    sharding = fsdp_config()
    if not launched():
        return None
    try:
        rt = AccelerateRuntime(device)
    except ImportError as e:
        raise ConfigError("multi-process training needs Hugging Face Accelerate: pip install 'softprompt[distributed]'") from e
    rt.sharding = sharding
    return rt


def accelerate_precision() -> str | None:
    """``--precision`` from ``accelerate launch --mixed_precision`` / the accelerate config
    (bf16, fp16), or None when it says "no" or nothing (then softprompt's own default holds)."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    return mp if mp in ("bf16", "fp16") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_config_is_fsdp() -> bool:
    """True when the user's default accelerate config (``accelerate config``) asks for FSDP."""
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        return os.path.isfile(default_config_file) and \
            str(load_config_from_file(default_config_file).distributed_type).upper().endswith("FSDP")
    except Exception:  # no accelerate, or a config it cannot read: accelerate launch will say so itself
        return False


def launch_command(train_args: Sequence[str], num_processes: int | None = None,
                   port: int | None = None, fsdp: bool = False) -> list[str]:
    """The ``accelerate launch`` command line that runs ``softprompt train TRAIN_ARGS`` (pure
    apart from picking a free port). Without ``num_processes`` the accelerate config decides;
    with it, ``fsdp`` keeps the config's FSDP settings (else the processes run data parallel)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
        if num_processes > 1:
            # "multi_gpu" is accelerate's torchrun launcher; on a machine without GPUs the
            # processes join a gloo group (AccelerateRuntime passes cpu=True).
            cmd += ["--use_fsdp" if fsdp else "--multi_gpu", "--main_process_port", str(port or _free_port())]
    return cmd + ["-m", "softprompt", "train", *train_args]


def relaunch(train_args: Sequence[str], num_processes: int | None = None) -> int:
    """``softprompt train --launcher accelerate ...``: run the same command under accelerate."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("--launcher accelerate needs Hugging Face Accelerate: pip install 'softprompt[distributed]'")
    proc = subprocess.run(launch_command(train_args, num_processes, fsdp=default_config_is_fsdp()))
    return 0 if proc.returncode == 0 else 2
