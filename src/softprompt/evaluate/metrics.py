"""Scoring a prompt (or no prompt) on examples, and the metrics: one path for all.

Training (dev metric, early stopping), ``softprompt eval`` and its baselines, and ``predict`` all
call :func:`score_classification` / :func:`generate_texts` and the metric functions here.
Baselines and reports live in their own modules; this one knows nothing of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..calibration import apply as calibrate
from ..data import Example, TaskSpec
from .. import progress
from ..model import PromptedModel
from ..prefix import source_state
from ..scoring import generate_after, label_logprobs
from ..tasks import TASKS


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches over items sorted by length (less padding); pure."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _row_prompts(prompt: torch.Tensor | None, n: int, dim: int, device, dtype) -> torch.Tensor:
    if prompt is None:  # the bare model: a zero-length prompt
        return torch.zeros(0, dim, device=device, dtype=dtype)
    return prompt


@torch.no_grad()
def score_classification(
    pm: PromptedModel,
    prompt: torch.Tensor | None,
    spec: TaskSpec,
    texts: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Class log-probabilities (normalised over the labels) of each text, (N, C).

    Args:
        prompt: (P, d) prompt, a deep prompt (layers, 2, H, P, hd), or None for the bare model.
    """
    tok = pm.base.tokenizer
    sources = [spec.source_ids(tok, t) for t in texts]
    label_ids = spec.label_ids(tok)
    out = torch.empty(len(texts), len(label_ids))
    p = _row_prompts(prompt, len(texts), pm.base.dim, pm.base.device, pm.lm.dtype)
    with progress.bar(len(texts), leave=False) as shown:
        for idx in _batches([len(s) for s in sources], batch_size):
            scores = label_logprobs(pm, source_state(pm, p, [sources[i] for i in idx]), label_ids)  # (b, C)
            out[idx] = scores.float().log_softmax(-1).cpu()
            shown.update(len(idx))
    return out


@torch.no_grad()
def generate_texts(
    pm: PromptedModel,
    prompt: torch.Tensor | None,
    spec: TaskSpec,
    texts: Sequence[str],
    batch_size: int = 16,
    **gen_kw,
) -> list[str]:
    """Generated continuation of each text (``gen_kw`` as :func:`softprompt.scoring.generate`)."""
    tok = pm.base.tokenizer
    sources = [spec.source_ids(tok, t) for t in texts]
    out: list[str] = [""] * len(texts)
    p = _row_prompts(prompt, len(texts), pm.base.dim, pm.base.device, pm.lm.dtype)
    with progress.bar(len(texts), leave=False) as shown:
        for idx in _batches([len(s) for s in sources], batch_size):
            for i, g in zip(idx, generate_after(pm, source_state(pm, p, [sources[i] for i in idx]), **gen_kw)):
                out[i] = g.text
            shown.update(len(idx))
    return out


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix (rows = gold)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    acc = sum(g == q for g, q in zip(gold, pred)) / max(1, len(gold))
    return {
        "accuracy": float(acc),
        "macro_f1": float(f.mean()),
        "per_class": {
            l: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, l in enumerate(labels)
        },
        "confusion": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels=labels).tolist()},
        "n": len(gold),
    }


def generation_metrics(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Exact match, ROUGE-L F1 (rouge-score) and chrF (sacrebleu), all in [0, 1]."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    em = [r.strip().lower() == h.strip().lower() for r, h in zip(refs, hyps)]
    chrf = CHRF().corpus_score(list(hyps), [list(refs)]).score / 100
    n = max(1, len(refs))
    return {"exact_match": sum(em) / n, "rouge_l": sum(rouge) / n, "chrf": float(chrf), "n": len(refs)}


PRIMARY_METRIC = {k: t.primary_metric for k, t in TASKS.items()}
"""The metric early stopping and summaries use for each task kind."""


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
    ``biases`` (C,): the prompt file's label calibration (softprompt.calibration)."""
    texts = [e.source for e in examples]
    gold = [e.target for e in examples]
    if spec.kind == "classify":
        logp = score_classification(pm, prompt, spec, texts, batch_size)  # (N, C)
        if biases is not None:
            logp = calibrate(logp, biases)  # (N, C)
        pred = [spec.labels[i] for i in logp.argmax(-1).tolist()]
        m = classification_metrics(gold, pred, spec.labels)
        m["log_loss"] = float(-logp[torch.arange(len(gold)), [spec.labels.index(g) for g in gold]].mean())
        m["predictions"] = pred
        return m
    gen_kw.setdefault("max_new_tokens", spec.max_target_length)
    hyps = generate_texts(pm, prompt, spec, texts, batch_size, **gen_kw)
    m = generation_metrics(gold, hyps)
    m["predictions"] = hyps
    return m
