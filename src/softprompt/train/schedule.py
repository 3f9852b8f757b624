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


def balanced_batch_at(step: int, keys: Sequence[tuple[int, object]], batch_size: int, seed: int,
                      _cache: dict | None = None) -> list[int]:
    """Class-balanced batch of step ``step`` (``--sampling balanced``; pure, drawn with replacement).

    ``keys[i]`` is row i's (task, class); generation rows carry one class per task. Each slot
    picks a row at random (so tasks keep their share of the data), then a class of that row's task
    uniformly, then a row of that class uniformly: every class of a task is seen equally often.
    The draw is seeded by (seed, step) alone, so a resumed run sees the same batches.
    """
    groups = (_cache or {}).get("groups")
    if groups is None:
        by_key: dict[tuple[int, object], list[int]] = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        classes: dict[int, list[tuple[int, object]]] = {}
        for k in by_key:  # first-seen order: deterministic
            classes.setdefault(k[0], []).append(k)
        groups = (by_key, classes)
        if _cache is not None:
            _cache["groups"] = groups
    by_key, classes = groups
    rng = random.Random(f"{seed}:balanced:{step}")
    out = []
    for _ in range(batch_size):
        task = keys[rng.randrange(len(keys))][0]
        out.append(rng.choice(by_key[rng.choice(classes[task])]))
    return out


def _uniform(step: int, lengths: Sequence[int], keys: Sequence[tuple[int, object]], batch_size: int, seed: int,
             cache: dict | None) -> list[int]:
    return batch_at(step, lengths, batch_size, seed, cache)


def _balanced(step: int, lengths: Sequence[int], keys: Sequence[tuple[int, object]], batch_size: int, seed: int,
              cache: dict | None) -> list[int]:
    return balanced_batch_at(step, keys, batch_size, seed, cache)


SAMPLINGS: dict[str, Callable[..., list[int]]] = {"uniform": _uniform, "balanced": _balanced}
"""``--sampling``: ``(step, lengths, keys, batch_size, seed, cache) -> the step's row indices``.
uniform: every row once per epoch, length-grouped (:func:`batch_at`); balanced: :func:`balanced_batch_at`."""


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
