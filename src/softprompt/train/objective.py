"""The training objective: a loss per row of a (possibly mixed-task) batch, through the one scoring
path in ``scoring.py`` and ``PromptedModel.target_logprobs``; each task kind's entry
(:mod:`softprompt.tasks`) computes the loss of its own rows.

- Classification rows are scored by rank classification over every label's full token sequence
  (``scoring.label_logprobs``); the loss is a cross-entropy over those C summed log-probabilities
  (``tasks.classify.CLASSIFY_LOSSES``), so training optimises exactly what prediction computes.
- Generation rows: mean negative log-likelihood of the target tokens (lm head at target
  positions only).

In a mixed batch every row carries its own task's prompt. Each distinct prompt runs through the
model once per batch and its keys/values serve all of its rows (``prefix.prefix_forward``); a deep
prompt (``--method prefix``) is already keys/values and joins the same batch without a pass. All
classification rows then share one source pass; the label continuation runs per task on that
task's rows (label sets differ). All generation rows share one teacher-forced pass. Each row's loss
is its own mean, so a row's loss (and its gradient) does not depend on which rows share the batch.

Not here: batching and order (schedule.py), the loop (loop.py), each kind's loss (tasks/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model import PromptedModel
from ..prefix import is_deep
from ..tasks import TASKS, labelled_kind


@dataclass
class Row:
    """One training row: its task (index into the prompts) and its tokens."""

    task: int
    source: list[int]
    """Token ids of the rendered source (template included)."""
    target: int | list[int]
    """Gold label index (classification) or target token ids, EOS included (generation)."""


def row_losses(
    pm: PromptedModel,
    prompts: Sequence[torch.Tensor | None],
    rows: Sequence[Row],
    label_ids: Sequence[list[list[int]] | None],
    classify_loss: str = "ce",
    share_prefix: bool = True,
    kinds: Sequence[str] | None = None,
) -> torch.Tensor:
    """Loss of every row, (len(rows),) float32, differentiable with respect to the prompts.

    Args:
        prompts: one prompt per task: input (P_t, d) or deep (layers, 2, H, P_t, hd); None for a
            task with no row in ``rows``.
        rows: the batch; ``rows[i].task`` indexes ``prompts`` and ``label_ids``.
        label_ids: per task, each label's token ids (classification) or None (generation).
        classify_loss: a key of :data:`softprompt.tasks.classify.CLASSIFY_LOSSES`.
        share_prefix: run each prompt once per batch (:func:`prefix_forward`) instead of once per
            row (the packed path of ``scoring.source_forward`` / ``target_logprobs``); same result.
            A batch with a deep prompt always takes the prefix path (it has no input embeddings).
        kinds: per task, its kind (a key of :data:`softprompt.tasks.TASKS`); default: classify
            where ``label_ids`` gives labels, else generate (:func:`~softprompt.tasks.labelled_kind`).
    """
    share_prefix = share_prefix or any(is_deep(prompts[r.task]) for r in rows)
    if kinds is None:
        kinds = [labelled_kind(ids is not None).name for ids in label_ids]
    pieces: list[torch.Tensor] = []
    order: list[int] = []
    for name, kind in TASKS.items():  # each kind's rows together, in registry order
        mine = [i for i, r in enumerate(rows) if kinds[r.task] == name]
        if mine:
            losses, at = kind.loss(pm, prompts, [rows[i] for i in mine], label_ids, share_prefix, classify_loss)
            pieces.append(losses)
            order.extend(mine[j] for j in at)
    flat = torch.cat(pieces)  # rows grouped by kind and task
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return flat[inverse.to(flat.device)]  # (n,) in the order of ``rows``
