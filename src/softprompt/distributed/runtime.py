"""Processes: who trains which rows, and how the prompt gradients meet.

A runtime tells the training loop its ``rank``, ``world_size`` and ``device``, sums tensors over
processes, gathers shards, and waits for the others. Training is data parallel: every process
holds the same prompts, takes its shard of each global batch (``batches.shard``), and only the
prompts' gradients (a few kilobytes) plus two loss scalars are all-reduced once per step. The
frozen base is replicated on every process, or, with an accelerate FSDP or DeepSpeed ZeRO-3
config (:func:`sharding_config`), sharded over them (sharding/). Logging, checkpoint writing and (with a
replicated base) evaluation happen on the main process; the others wait.

- :class:`LocalRuntime`: one process.
- :class:`AccelerateRuntime`: under ``accelerate launch`` (Hugging Face Accelerate sets up the
  process group: NCCL on GPUs, gloo on CPUs).

Not here: reading and starting ``accelerate launch`` (launch.py), the loop (train/loop.py), how the
base is sharded (sharding/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .launch import _env_true, deepspeed_config, deepspeed_note, launched, sharding_config
from .sharding import ShardingConfig


class LocalRuntime:
    """One process, no communication."""

    world_size = 1
    rank = 0
    is_main = True

    sharding: ShardingConfig | None = None
    """Set when the launch config asks for FSDP or DeepSpeed ZeRO-3: the frozen base is sharded
    (sharding/)."""

    note: str | None = None
    """A line on how the launch config was read (DeepSpeed), shown when training starts."""

    deepspeed: dict | None = None
    """The DeepSpeed config of an accelerate DeepSpeed launch, read once (:func:`deepspeed_config`)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place."""

    def all_gather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        """Write every process's ``shard`` (n,) into ``out`` (W * n,), in rank order."""
        out.copy_(shard)

    def scatter(self, full: torch.Tensor | None, out: torch.Tensor) -> None:
        """Process 0's ``full`` (W * n,) cut into W slices; this process's slice into ``out`` (n,).
        The other processes pass ``full=None``."""
        assert full is not None
        out.copy_(full)

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with process 0's, in place."""

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

    def scatter(self, full: torch.Tensor | None, out: torch.Tensor) -> None:
        if self.world_size == 1:
            return super().scatter(full, out)
        import torch.distributed as dist

        dist.scatter(out, list(full.chunk(self.world_size)) if self.rank == 0 else None, src=0)

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(t, src=0)

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


def runtime_from_env(device: str | None = None) -> LocalRuntime | None:
    """The runtime this process was started for: Accelerate's when launched with several
    processes (its ``sharding`` set by an FSDP config), else None (the training loop then runs
    alone, unsharded)."""
    ds = deepspeed_config() if _env_true("ACCELERATE_USE_DEEPSPEED") else None
    sharding = sharding_config(ds)
    if not launched():
        return None
    try:
        rt = AccelerateRuntime(device)
    except ImportError as e:
        raise ConfigError("multi-process training needs Hugging Face Accelerate: pip install 'softprompt[distributed]'") from e
    rt.sharding, rt.deepspeed = sharding, ds
    if ds is not None:
        rt.note = deepspeed_note(ds)
    return rt


def shutdown() -> None:
    """End of a launched command, after its last collective: leave the process group, so its
    communication threads are joined before the interpreter exits.

    Quirk (DeepSpeed 0.19.8; importing it is enough): gloo's threads then outlive
    ``destroy_process_group``, and tearing them down at interpreter exit aborts the process now and
    then (SIGABRT after a finished run; about 1 in 20 on 2 CPU processes). Such a process exits at
    once instead: everything is written and fsynced by then.
    """
    if not (launched() and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    if "deepspeed" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
