"""Imbalanced labels: per-class loss weights, and the dev metric that picks the best prompt.

When two thirds of the training rows share one label, the plain cross-entropy is lowest for a prompt
that rarely predicts the rare classes, and dev accuracy (the usual selection metric) rewards that
prompt too. Three settings answer this, each resolved here per task from its training labels:

- ``--class-weights``: each row's loss times its class's weight (:data:`CLASS_WEIGHTS`), weights
  normalised so that they average 1 over the task's training rows (the loss scale, and so the
  learning rate, means the same as unweighted).
- ``--sampling balanced``: batches drawn class-balanced (schedule.py: ``SAMPLINGS``).
- ``--select-metric``: the dev metric that keeps the best prompt and drives early stopping
  (:data:`SELECT_METRICS`).

``auto`` (weights, select metric) switches on for a classification task whose training labels are
skewed beyond :data:`AUTO_RATIO` (most / least frequent class), and leaves every other task as it
always was. Defaults (README "Imbalanced labels" has the measurements): select metric ``auto``
(picking the checkpoint by macro-F1 costs no training), class weights ``none`` and sampling
``uniform`` (on the measured task balanced weights cost accuracy without raising macro-F1; balanced
sampling raised macro-F1 at a large cost in accuracy: a choice for the user, said at the start of
a skewed run). Generation tasks have no classes: weight 1, their primary metric.

Not here: the loss per row (objective.py), the data order (schedule.py), the loop that weighs and
selects (loop.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..tasks import TASKS
from .schedule import SAMPLINGS

AUTO_RATIO = 3.0
"""``auto`` treats a task as imbalanced when its most frequent training label has more than this
many times the rows of its least frequent one (README, "Imbalanced labels": where accuracy and
macro-F1 part ways)."""


def _no_weights(counts: Sequence[int]) -> list[float]:
    return [1.0] * len(counts)


def _balanced(counts: Sequence[int]) -> list[float]:
    """Inverse class frequency, ``N / (C * n_c)`` over the C classes present (scikit-learn's
    "balanced"): the mean weight over the training rows is exactly 1. A label with no training
    rows gets weight 0 (no row carries it)."""
    n, present = sum(counts), sum(1 for c in counts if c > 0)
    return [n / (present * c) if c > 0 else 0.0 for c in counts]


CLASS_WEIGHTS: dict[str, Callable[[Sequence[int]], list[float]]] = {"none": _no_weights, "balanced": _balanced}
"""``--class-weights``: training rows per label (C,) -> loss weight per label (C,)."""
CLASS_WEIGHT_CHOICES: tuple[str, ...] = ("auto", *CLASS_WEIGHTS)

SELECT_METRICS: dict[str, int] = {"accuracy": 1, "macro_f1": 1, "log_loss": -1}
"""``--select-metric`` (classification): dev metric -> direction (1: higher is better)."""
SELECT_METRIC_CHOICES: tuple[str, ...] = ("auto", *SELECT_METRICS)


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Most / least frequent label among those with training rows (1.0: balanced)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


@dataclass(frozen=True)
class TaskBalance:
    """How one task's classes are handled, resolved from its training labels."""

    counts: dict[str, int]
    """Training rows per label (classification; empty for generation)."""
    ratio: float
    """:func:`imbalance_ratio` of ``counts``."""
    class_weights: str
    """The resolved ``--class-weights`` ("none" or "balanced")."""
    weights: list[float]
    """Loss weight per label index (empty for generation: every row weighs 1)."""
    select_metric: str
    """The dev metric that keeps the best prompt."""
    sampling: str
    """``--sampling`` of the run."""

    @property
    def direction(self) -> int:
        """1 when a higher ``select_metric`` is better, -1 when lower is."""
        return SELECT_METRICS.get(self.select_metric, 1)

    def weight_of(self, target: Any) -> float:
        """The loss weight of a row with this target (label index; generation rows weigh 1)."""
        return self.weights[target] if self.weights and isinstance(target, int) else 1.0

    def summary(self) -> dict:
        """What the prompt file's training summary and metrics.jsonl record."""
        return {"label_counts": self.counts, "imbalance_ratio": round(self.ratio, 3),
                "class_weights": self.class_weights,
                "weights": dict(zip(self.counts, (round(w, 6) for w in self.weights))),
                "select_metric": self.select_metric, "sampling": self.sampling}


def resolve_task(kind: str, labels: Sequence[str] | None, targets: Sequence[str], class_weights: str,
                 select_metric: str, sampling: str) -> TaskBalance:
    """One task's :class:`TaskBalance` from its kind, labels and training targets (pure)."""
    primary = TASKS[kind].primary_metric
    if not TASKS[kind].labelled:
        return TaskBalance({}, 1.0, "none", [], primary, sampling)
    counted = Counter(targets)
    counts = {label: counted.get(label, 0) for label in labels or []}
    ratio = imbalance_ratio(list(counts.values()))
    skewed = ratio > AUTO_RATIO
    cw = ("balanced" if skewed else "none") if class_weights == "auto" else class_weights
    sm = ("macro_f1" if skewed else primary) if select_metric == "auto" else select_metric
    return TaskBalance(counts, ratio, cw, CLASS_WEIGHTS[cw](list(counts.values())), sm, sampling)


def resolve(config, tasks) -> list[TaskBalance]:
    """Every task's :class:`TaskBalance` (``tasks``: prepare.PreparedTask, in order)."""
    return [resolve_task(t.spec.kind, t.spec.labels, [ex.target for ex in t.train], config.class_weights,
                         config.select_metric, config.sampling) for t in tasks]


def check(config) -> None:
    """``--class-weights`` / ``--select-metric`` / ``--sampling`` checked against the choices and
    the task kinds (TrainConfig.__post_init__ calls this; errors name the flag)."""
    for flag, value, choices in (("--class-weights", config.class_weights, CLASS_WEIGHT_CHOICES),
                                 ("--select-metric", config.select_metric, SELECT_METRIC_CHOICES),
                                 ("--sampling", config.sampling, tuple(SAMPLINGS))):
        if value not in choices:
            raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    if any(TASKS[t.task].labelled for t in config.tasks_resolved):
        return
    for flag, value, plain in (("--class-weights", config.class_weights, ("auto", "none")),
                               ("--select-metric", config.select_metric, ("auto",)),
                               ("--sampling", config.sampling, ("uniform",))):
        if value not in plain:
            raise ConfigError(f"{flag} {value} needs a classification task (labels); generation has none")
