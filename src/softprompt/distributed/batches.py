"""How one global batch is split over processes and micro-batches (pure functions, no torch).

A step's batch is chosen by the schedule (train/schedule.py); here it is dealt to processes and
cut into gradient-accumulation micro-batches, and, with a sharded base, completed so that every
process runs the same layers in the same order.

Not here: which rows form a step's batch (train/schedule.py), the collectives (runtime.py).
"""

from __future__ import annotations

from typing import Sequence


def shard(batch: Sequence[int], world_size: int, rank: int, micro_batches: int) -> list[list[int]]:
    """This process's micro-batches of a global batch (pure).

    Rows are dealt round-robin over processes (the batch is sorted by length, so every process
    gets a similar mix of lengths), then cut into ``micro_batches`` contiguous chunks.
    """
    mine = list(batch[rank::world_size])
    if len(mine) % micro_batches:
        raise ValueError(f"{len(mine)} rows do not split into {micro_batches} micro-batches")
    k = len(mine) // micro_batches
    return [mine[j : j + k] for j in range(0, len(mine), k)]


def lockstep_micro_batches(batch: Sequence[int], task_of: Sequence[int], world_size: int, rank: int,
                           micro_batches: int) -> list[tuple[list[int], int]]:
    """This process's micro-batches, each completed so that every process runs the same layers (pure).

    A process whose :func:`shard` micro-batch lacks a task that another process has in the same
    micro-batch borrows that task's first row of the global micro-batch. Borrowed rows go last and
    carry no loss.

    Returns:
        Per micro-batch ``(row indices, number of own rows)``; the own rows come first.
    """
    parts = [shard(batch, world_size, r, micro_batches) for r in range(world_size)]
    out = []
    for m, mine in enumerate(parts[rank]):
        first: dict[int, int] = {}  # task -> its first row in the global micro-batch (rank order)
        for r in range(world_size):
            for i in parts[r][m]:
                first.setdefault(task_of[i], i)
        have = {task_of[i] for i in mine}
        borrowed = [i for t, i in sorted(first.items()) if t not in have]
        out.append((list(mine) + borrowed, len(mine)))
    return out
