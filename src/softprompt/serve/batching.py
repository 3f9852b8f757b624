"""Pure batching functions of the serving engine: which jobs run together, how each row's cached
prompt prefix and source are laid out, and how outputs are split back. No model, no threads.

Layout of a batched row (the prefixes are stacked by prefix.py), mirroring model.py (where the
prompt is embeddings, here it is its cached keys/values; Pmax = longest prefix in the batch):

    [ gap (Pmax - P_i, masked) | prefix_i KV (P_i) | pad (masked) | source_i | generated ... ]

Position ids are ``cumsum(mask) - 1``, so row i's source continues at position P_i whatever the gap.
The cache of a running generation may hold masked columns anywhere (rows that joined later are
left-padded to the batch's length), which is correct for the same reason.
"""

from __future__ import annotations

from typing import Hashable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from ..prefix import KV
from ..tasks import TASKS

T = TypeVar("T")


def select_jobs(
    kinds: Sequence[str],
    rows: Sequence[int],
    tokens: Sequence[int],
    max_rows: int,
    free_generate_rows: int,
    max_tokens: int,
) -> list[int]:
    """Pick queued jobs for the next step, in arrival order (pure).

    A job is taken if its rows still fit: classification rows count against ``max_rows`` (one
    forward pass), generation rows against ``free_generate_rows`` (slots left in the running
    generation batch); and if its source tokens fit the step's ``max_tokens`` budget (shared by
    both kinds, so one step stays short and a running generation keeps decoding; the first job
    is always taken, whatever its size). Jobs that do not fit are skipped, not blocking the ones
    behind them.

    Args:
        kinds: the task kind of each queued job ("classify", "generate": :data:`softprompt.tasks.TASKS`).
        rows: rows each job needs (an ensemble of k prompts needs k).
        tokens: source tokens each job reads (over all its rows).
    Returns:
        Indices of the jobs to take.
    """
    cap = {k: free_generate_rows if t.serving.decodes else max_rows for k, t in TASKS.items()}
    taken, used, used_tokens = [], dict.fromkeys(cap, 0), 0
    for i, (kind, n, t) in enumerate(zip(kinds, rows, tokens)):
        if used[kind] + n <= cap[kind] and (used_tokens + t <= max_tokens or not taken):
            used[kind] += n
            used_tokens += t
            taken.append(i)
    return taken


def select_rows(layers: Sequence[KV], mask: torch.Tensor, idx: torch.Tensor | Sequence[int]) -> tuple[list[KV], torch.Tensor]:
    """Keep rows ``idx`` of a batched cache (B, H, L, hd) and its mask (B, L) (pure)."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=mask.device)
    return [(k[idx], v[idx]) for k, v in layers], mask[idx]


def trim_left(layers: Sequence[KV], mask: torch.Tensor) -> tuple[list[KV], torch.Tensor]:
    """Drop leading columns that no row attends to (after rows left the batch) (pure)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    if start == 0:
        return list(layers), mask
    return [(k[:, :, start:], v[:, :, start:]) for k, v in layers], mask[:, start:]


def concat_rows(a: tuple[Sequence[KV], torch.Tensor], b: tuple[Sequence[KV], torch.Tensor]) -> tuple[list[KV], torch.Tensor]:
    """Join two batched caches row-wise, left-padding the shorter with masked columns (pure).

    Args:
        a, b: ``(layers, mask)`` with layers of (B_x, H, L_x, hd) and mask (B_x, L_x).
    Returns:
        ``(layers, mask)`` of (B_a + B_b, H, max(L_a, L_b), hd) and (B_a + B_b, max(L_a, L_b)).
    """
    (la, ma), (lb, mb) = a, b
    L = max(ma.shape[1], mb.shape[1])

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # left-pad the sequence dim (-2 for KV, -1 for masks)
        if n == 0:
            return t
        return F.pad(t, (0, 0, n, 0)) if t.dim() == 4 else F.pad(t, (n, 0))

    na, nb = L - ma.shape[1], L - mb.shape[1]
    layers = [(torch.cat([pad(ka, na), pad(kb, nb)]), torch.cat([pad(va, na), pad(vb, nb)]))
              for (ka, va), (kb, vb) in zip(la, lb)]
    return layers, torch.cat([pad(ma, na), pad(mb.to(ma), nb)])


def group_indices(keys: Sequence[Hashable]) -> list[tuple[Hashable, list[int]]]:
    """Group row indices by key, groups in order of first appearance (pure).

    Used to score each distinct label set once over the rows that share it.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.items())


def task_cost(n_rows: int, label_ids: Sequence[Sequence[int]]) -> int:
    """Label tokens the model runs to score ``label_ids`` over ``n_rows`` rows (pure): each label
    continues each row for (longest label - 1) tokens; single-token labels only read the source's
    last position (no continuation, cost 0)."""
    longest = max((len(x) for x in label_ids), default=1)
    return n_rows * len(label_ids) * (longest - 1)


def label_chunks(label_ids: Sequence[Sequence[int]], n_rows: int, budget: int) -> list[tuple[int, tuple]]:
    """Split a label set into consecutive chunks of at most ``budget`` label tokens over ``n_rows``
    rows each (:func:`task_cost`; a chunk has at least one label) (pure).

    Returns:
        ``(start, labels)`` pairs: the index of the chunk's first label and its labels.
    """
    chunks, start, cur = [], 0, []
    for i, ids in enumerate(label_ids):
        if cur and task_cost(n_rows, cur + [ids]) > budget:
            chunks.append((start, tuple(cur)))
            start, cur = i, []
        cur.append(tuple(ids))
    if cur:
        chunks.append((start, tuple(cur)))
    return chunks


def split_rows(items: Sequence[T], counts: Sequence[int]) -> list[list[T]]:
    """Split a flat per-row sequence back into consecutive per-job chunks (pure)."""
    if sum(counts) != len(items):
        raise ValueError(f"counts {list(counts)} do not add up to {len(items)} rows")
    out, i = [], 0
    for n in counts:
        out.append(list(items[i : i + n]))
        i += n
    return out


def ensemble_probs(scores: torch.Tensor) -> torch.Tensor:
    """Average class probabilities over an ensemble's members, (k, C) scores -> (C,) (pure)."""
    return scores.float().softmax(-1).mean(0)
