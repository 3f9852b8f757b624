"""The classification kind (``--task classify``): rank classification over a fixed label set.

Each label's verbalized words are scored as a continuation of the source; the label whose words
are most likely wins. Training minimises a cross-entropy over those C summed log-probabilities
(``CLASSIFY_LOSSES``), so it optimises exactly what prediction computes; evaluation reports
accuracy, macro-F1 and log-loss; ``predict`` answers a label and its probabilities.

Not here: the scoring path itself (scoring.label_logprobs), label calibration (calibration.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import progress
from ..calibration import apply as calibrate
from ..errors import DataError
from ..model import PromptedModel
from ..prefix import prefill, prefix_forward, source_state
from ..scoring import label_logprobs, source_forward
from .shared import length_batches, prompts_for, row_prompts
from .task import Example, Serving, Spec, Task


def check_spec(spec: Spec) -> None:
    """At least 2 distinct labels; a verbalizer naming only known labels, with distinct, non-empty words."""
    if not spec.labels or len(spec.labels) < 2:
        raise DataError(f"a classification task needs at least 2 labels, got {spec.labels or []}")
    if len(set(spec.labels)) != len(spec.labels):
        raise DataError(f"duplicate labels in {spec.labels}")
    verb = spec.verbalizer or {}
    unknown = [k for k in verb if k not in spec.labels]
    if unknown:
        raise DataError(f"verbalizer names unknown label(s) {unknown}; labels are {spec.labels}")
    words = spec.words
    if any(not w.strip() for w in words):
        raise DataError("verbalizer maps a label to empty words")
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
        raise DataError(f"verbalizer maps several labels to the same words {dup}")


# ----------------------------------------------------------------------------- training


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
"""``--classify-loss``: ``(scores (B, C), gold (B,), label token counts (C,)) -> loss per row (B,)``."""


def loss(pm: PromptedModel, prompts, rows, label_ids, share_prefix: bool, classify_loss: str = "ce"):
    """Loss of classification rows: one source pass for all, the label continuation per task
    (label sets differ). Returns (losses (n,) float32, the index into ``rows`` of each)."""
    tasks = [r.task for r in rows]
    sources = [r.source for r in rows]
    if share_prefix:
        state = prefill(pm, prefix_forward(pm, prompts, tasks), sources)  # as the serving engine reads
    else:
        state = source_forward(pm, prompts_for(prompts, tasks), sources)
    pieces, order = [], []
    for t in sorted(set(tasks)):
        sub = [j for j, tj in enumerate(tasks) if tj == t]
        st = state if len(sub) == len(rows) else state.select(sub)
        scores = label_logprobs(pm, st, label_ids[t]).float()  # (b, C)
        gold = torch.tensor([rows[j].target for j in sub], dtype=torch.long, device=scores.device)
        lens = torch.tensor([len(l) for l in label_ids[t]], dtype=torch.float32, device=scores.device)  # (C,)
        pieces.append(CLASSIFY_LOSSES[classify_loss](scores, gold, lens))
        order.extend(sub)
    return torch.cat(pieces), order


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_classification(
    pm: PromptedModel,
    prompt: torch.Tensor | None,
    spec: Spec,
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
    p = row_prompts(prompt, pm.base.dim, pm.base.device, pm.lm.dtype)
    with progress.bar(len(texts), leave=False) as shown:
        for idx in length_batches([len(s) for s in sources], batch_size):
            scores = label_logprobs(pm, source_state(pm, p, [sources[i] for i in idx]), label_ids)  # (b, C)
            out[idx] = scores.float().log_softmax(-1).cpu()
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


def evaluate(pm: PromptedModel, prompt: torch.Tensor | None, spec: Spec, examples: Sequence[Example],
             batch_size: int = 16, biases: torch.Tensor | None = None, **gen_kw) -> dict:
    """Classification metrics, ``log_loss`` and ``predictions``; ``biases`` (C,) calibrate the scores."""
    texts = [e.source for e in examples]
    gold = [e.target for e in examples]
    logp = score_classification(pm, prompt, spec, texts, batch_size)  # (N, C)
    if biases is not None:
        logp = calibrate(logp, biases)  # (N, C)
    pred = [spec.labels[i] for i in logp.argmax(-1).tolist()]
    m = classification_metrics(gold, pred, spec.labels)
    m["log_loss"] = float(-logp[torch.arange(len(gold)), [spec.labels.index(g) for g in gold]].mean())
    m["predictions"] = pred
    return m


# ----------------------------------------------------------------------------- baselines, predict


def _instruction(spec: Spec, name: str | None) -> str:
    what = f"the {name} of the text" if name else "the text"
    return f"Classify {what} as one of: {', '.join(spec.words)}."


def _shot_target(spec: Spec, ex: Example, tokenizer, budget: int) -> str:
    return spec.words[spec.labels.index(ex.target)] if ex.target in spec.labels else ex.target


def _shot_frame(spec: Spec, tokenizer, min_text: int) -> int:
    target = max(spec.words, key=lambda w: len(tokenizer(w, add_special_tokens=False)["input_ids"]))
    return len(tokenizer(spec.render("") + spec._lead() + target, add_special_tokens=False)["input_ids"])


def predict(predictor, texts: list[str]) -> list[dict]:
    """``{"label", "probs"}`` per text, the prompt file's calibration applied."""
    spec = predictor.spec
    logp = score_classification(predictor.pm, predictor.prompt, spec, texts, predictor.config.batch_size)  # (N, C)
    if predictor.biases is not None:  # --calibrate: the prompt file's label biases
        logp = calibrate(logp, predictor.biases)  # (N, C)
    probs = logp.exp()  # (N, C)
    return [{"label": spec.labels[int(row.argmax())],
             "probs": {l: round(float(p), 6) for l, p in zip(spec.labels, row.tolist())}}
            for row in probs]


CLASSIFY = Task(
    name="classify",
    about="rank classification over a fixed label set (accuracy, macro-F1)",
    placeholder="text",
    template="Text: {text}\nLabel:",
    fields=("text", "label"),
    field_flags=("--text-field", "--label-field"),
    labelled=True,
    check_spec=check_spec,
    label_ids=lambda spec, tok: spec.label_ids(tok),
    encode_target=lambda spec, tok, target: spec.labels.index(target),
    loss=loss,
    init=lambda has_text: "labels",
    generates=False,
    evaluate=evaluate,
    primary_metric="accuracy",
    columns=(("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("log_loss", "log-loss")),
    report_columns=(("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    baselines=("bare", "instruction", "instruction-chat", "few-shot", "tfidf-lr"),
    instruction=_instruction,
    shot_target=_shot_target,
    shot_frame=_shot_frame,
    predict=predict,
    serving=Serving(start=lambda steps: steps.classify, running=lambda steps: steps.scoring_jobs,
                    advance=lambda steps: steps.score, decodes=False),  # one pass over the label continuations
)
