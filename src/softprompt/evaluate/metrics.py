"""Scoring a prompt (or no prompt) on examples: one path for all, through the task kind's entry.

Training (dev metric, early stopping), ``softprompt eval`` and its baselines all call
:func:`evaluate_prompt`, which asks the kind (:mod:`softprompt.tasks`) how to score and which
metrics to report: rank classification (``tasks/classify.py``: :func:`score_classification`,
:func:`classification_metrics`) or generation (``tasks/generate.py``: :func:`generate_texts`,
:func:`generation_metrics`). Baselines and reports live in their own modules; this one knows
nothing of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import Example, TaskSpec
from ..model import PromptedModel
from ..tasks import TASKS, task

PRIMARY_METRIC = {k: t.primary_metric for k, t in TASKS.items()}
"""The metric early stopping and summaries use for each task kind (a view of the registry)."""


def evaluate_prompt(
    pm: PromptedModel,
    prompt: torch.Tensor | None,
    spec: TaskSpec,
    examples: Sequence[Example],
    batch_size: int = 16,
    biases: torch.Tensor | None = None,
    **gen_kw,
) -> dict:
    """Metrics of ``prompt`` (or the bare model) on labelled examples, plus the predictions;
    ``biases`` (C,): the prompt file's label calibration (softprompt.calibration); ``gen_kw``:
    generation settings (``max_new_tokens``, ``stop``...) for a kind that generates."""
    return task(spec.kind).evaluate(pm, prompt, spec, examples, batch_size, biases, **gen_kw)
