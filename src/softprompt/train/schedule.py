"""What is trained when: the seeded, length-grouped data order, how a step's batch is split over
processes and micro-batches, and the learning-rate schedule. Pure functions of (seed, step).

Because the order is a pure function of the seed and the step number, a resumed run picks up at
exactly the batch an uninterrupted run would see next, and a step's batch is the same whatever the
number of processes or gradient-accumulation micro-batches it is split into.

Not here: the loss (objective.py) or the loop (loop.py).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from ..distributed.batches import shard  # noqa: F401  (re-exported: how a step's batch is split)

GROUP_BATCHES = 32
"""Batches per length group: examples are sorted by length inside windows of this many batches,
so a batch holds similar lengths (little padding) while the order stays random across windows."""

BUCKET_TOKENS = 16
"""Lengths are compared in buckets of this many tokens; inside a bucket the order stays random, so
batches are not sorted by exact length (which can correlate with the label) at the cost of at most
15 padding tokens per row."""


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group: int = GROUP_BATCHES, bucket: int = BUCKET_TOKENS) -> list[list[int]]:
    """The batches of one epoch, each exactly ``batch_size`` example indices (pure).

    Seeded shuffle; inside windows of ``group`` batches the examples are sorted by length bucket
    (``bucket`` tokens wide; shuffled order within a bucket) and cut into batches; then the batch
    order is shuffled. The ``len % batch_size`` examples left over sit out this epoch (a different
    few each epoch).
    """
    n = len(lengths)
    if batch_size < 1 or n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, got {n}")
    rng = random.Random(f"{seed}:{epoch}")  # str seeds hash stably across processes
    order = list(range(n))
    rng.shuffle(order)
    order = order[: n - n % batch_size]
    window = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        rank = {i: k for k, i in enumerate(chunk)}  # random position, kept inside a bucket
        chunk = sorted(chunk, key=lambda i: (lengths[i] // bucket, rank[i]))
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size


def batch_at(step: int, lengths: Sequence[int], batch_size: int, seed: int,
             _cache: dict | None = None) -> list[int]:
    """Example indices of the global batch of optimizer step ``step`` (0-based; pure).

    ``_cache`` (a dict the caller keeps) memoizes the current epoch's batches.
    """
    per = steps_per_epoch(len(lengths), batch_size)
    epoch, i = divmod(step, per)
    if _cache is not None:
        if _cache.get("epoch") != epoch:
            _cache.clear()
            _cache.update(epoch=epoch, batches=epoch_batches(lengths, batch_size, seed, epoch))
        return _cache["batches"][i]
    return epoch_batches(lengths, batch_size, seed, epoch)[i]




# ----------------------------------------------------------------------------- learning rate


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES: dict[str, Callable[[float], float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}
"""Decay after warmup: progress in [0, 1] -> multiplier of the peak learning rate."""


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``--warmup``: a fraction of all steps when below 1, else a number of steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_at(step: int, total_steps: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps to
    ``peak``, then ``SCHEDULES[schedule]`` decay to the last step (pure)."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    span = max(1, total_steps - warmup)
    return peak * SCHEDULES[schedule]((step - warmup) / span)
