"""The training objective: a loss per row of a (possibly mixed-task) batch, through the one scoring
path in ``scoring.py`` and ``PromptedModel.target_logprobs``.

- Classification rows are scored by rank classification over every label's full token sequence
  (``scoring.label_logprobs``); the loss is a cross-entropy over those C summed log-probabilities
  (``CLASSIFY_LOSSES``), so training optimises exactly what prediction computes.
- Generation rows: mean negative log-likelihood of the target tokens (lm head at target
  positions only).

In a mixed batch every row carries its own task's prompt. Each distinct prompt runs through the
model once per batch and its keys/values serve all of its rows (``prefix.prefix_forward``); a deep
prompt (``--method prefix``) is already keys/values and joins the same batch without a pass. All
classification rows then share one source pass; the label continuation runs per task on that
task's rows (label sets differ). All generation rows share one teacher-forced pass. Each row's loss
is its own mean, so a row's loss (and its gradient) does not depend on which rows share the batch.

Not here: batching and order (schedule.py), the loop (loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import IGNORE_INDEX, PromptedModel
from ..prefix import is_deep, prefill, prefix_forward, read_after
from ..scoring import label_logprobs, pad_id, right_pad, source_forward


@dataclass
class Row:
    """One training row: its task (index into the prompts) and its tokens."""

    task: int
    source: list[int]
    """Token ids of the rendered source (template included)."""
    target: int | list[int]
    """Gold label index (classification) or target token ids, EOS included (generation)."""


def _ce(scores: torch.Tensor, gold: torch.Tensor, label_lens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labels' summed log-probs, per row (B,)."""
    return F.cross_entropy(scores, gold, reduction="none")


def _ce_lm(scores: torch.Tensor, gold: torch.Tensor, label_lens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the gold label's own per-token LM loss, per row (B,)."""
    nll = -scores.gather(1, gold[:, None])[:, 0] / label_lens[gold]  # (B,)
    return F.cross_entropy(scores, gold, reduction="none") + nll


CLASSIFY_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": _ce,
    "ce+lm": _ce_lm,
}
"""``(scores (B, C), gold (B,), label token counts (C,)) -> loss per row (B,)``."""


def _prompts_for(prompts: Sequence[torch.Tensor], tasks: Sequence[int]):
    """One shared (P, d) tensor when all rows are of one task, else a per-row list."""
    if len(set(tasks)) == 1:
        return prompts[tasks[0]]
    return [prompts[t] for t in tasks]


def row_losses(
    pm: PromptedModel,
    prompts: Sequence[torch.Tensor | None],
    rows: Sequence[Row],
    label_ids: Sequence[list[list[int]] | None],
    classify_loss: str = "ce",
    share_prefix: bool = True,
) -> torch.Tensor:
    """Loss of every row, (len(rows),) float32, differentiable with respect to the prompts.

    Args:
        prompts: one prompt per task: input (P_t, d) or deep (layers, 2, H, P_t, hd); None for a
            task with no row in ``rows``.
        rows: the batch; ``rows[i].task`` indexes ``prompts`` and ``label_ids``.
        label_ids: per task, each label's token ids (classification) or None (generation).
        classify_loss: a key of :data:`CLASSIFY_LOSSES`.
        share_prefix: run each prompt once per batch (:func:`prefix_forward`) instead of once per
            row (the packed path of ``scoring.source_forward`` / ``target_logprobs``); same result.
            A batch with a deep prompt always takes the prefix path (it has no input embeddings).
    """
    dev = pm.base.device
    share_prefix = share_prefix or any(is_deep(prompts[r.task]) for r in rows)
    pieces: list[torch.Tensor] = []
    order: list[int] = []
    cls = [i for i, r in enumerate(rows) if label_ids[r.task] is not None]
    gen = [i for i, r in enumerate(rows) if label_ids[r.task] is None]
    if cls:
        tasks = [rows[i].task for i in cls]
        sources = [rows[i].source for i in cls]
        if share_prefix:
            state = prefill(pm, prefix_forward(pm, prompts, tasks), sources)  # as the serving engine reads
        else:
            state = source_forward(pm, _prompts_for(prompts, tasks), sources)
        for t in sorted(set(tasks)):
            sub = [j for j, tj in enumerate(tasks) if tj == t]
            st = state if len(sub) == len(cls) else state.select(sub)
            scores = label_logprobs(pm, st, label_ids[t]).float()  # (b, C)
            gold = torch.tensor([rows[cls[j]].target for j in sub], dtype=torch.long, device=scores.device)
            lens = torch.tensor([len(l) for l in label_ids[t]], dtype=torch.float32, device=scores.device)  # (C,)
            pieces.append(CLASSIFY_LOSSES[classify_loss](scores, gold, lens))
            order.extend(cls[j] for j in sub)
    if gen:
        tasks = [rows[i].task for i in gen]
        seqs = [rows[i].source + list(rows[i].target) for i in gen]
        ids, mask = right_pad(seqs, pad_id(pm), dev)  # (b, T)
        labels = torch.full_like(ids, IGNORE_INDEX)  # (b, T): loss only on target tokens
        for k, i in enumerate(gen):
            s, t = len(rows[i].source), len(rows[i].target)
            labels[k, s : s + t] = ids[k, s : s + t]
        if share_prefix:
            hidden, _, _ = read_after(pm, prefix_forward(pm, prompts, tasks), ids, mask)  # (b, T, d)
            sums, counts = pm.score_targets(hidden, labels)  # (b,), (b,)
        else:
            sums, counts = pm.target_logprobs(ids, mask, _prompts_for(prompts, tasks), labels)
        pieces.append(-(sums.float() / counts.clamp(min=1)))  # (b,) mean NLL per row
        order.extend(gen)
    flat = torch.cat(pieces)  # rows grouped by kind and task
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return flat[inverse.to(flat.device)]  # (n,) in the order of ``rows``
