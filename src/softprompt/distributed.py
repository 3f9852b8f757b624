"""Processes: who trains which rows, and how the prompt gradients meet.

A runtime tells the training loop its ``rank``, ``world_size`` and ``device``, sums tensors over
processes (only the prompts' gradients and two loss scalars: a few kilobytes per step), and waits
for the others. :class:`LocalRuntime` is one process; :class:`AccelerateRuntime` runs under
``accelerate launch`` (data parallel: each process takes its shard of every global batch; the base
model is frozen and never synchronised).

Not here: the loop (train.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
        """Sum each tensor over processes, in place (nothing to do alone)."""

    def barrier(self) -> None:
        """Wait for every process."""

    def check_same(self, value: str, what: str, path: Path | str) -> None:
        """Raise if processes disagree on ``value`` (e.g. the checkpoint they resume from)."""
