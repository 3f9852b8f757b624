"""Class-prior calibration of label scores: per-label additive biases on the label log-probabilities,
fitted on dev to maximise the run's selection metric, stored in the prompt file, applied the same
way by every path that turns label scores into an answer (eval, predict, serve on both backends,
the OpenAI API's label logprobs).

A bias shifts a label's summed log-probability before the softmax, so ``softmax(scores + b)`` is
the calibrated distribution whether ``scores`` are raw summed log-probs (serving) or already
normalised over the labels (eval, predict): the two differ by a per-row constant.

Not here: where the dev scores come from (train/loop.py), the metrics (evaluate/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

CALIBRATION_VERSION = 1
"""Version of the ``calibration`` object in a prompt file's metadata."""
CALIBRATE_CHOICES: tuple[str, ...] = ("auto", "none")
Calibrate = Literal["auto", "none"]

GRID = tuple(x / 4 for x in range(-24, 25))
"""Bias values tried for each label in the coordinate search: -6 .. 6 in steps of 0.25 (nats)."""
ROUNDS = 3
"""Passes of the coordinate search over the labels."""


class CalibrationError(ValueError):
    """A malformed ``calibration`` object in a prompt file."""


@dataclass(frozen=True)
class Calibration:
    """Per-label additive biases on the label log-probabilities (label order = the prompt's labels)."""

    biases: tuple[float, ...]
    metric: str
    """The dev metric the biases were fitted to."""
    dev_before: float
    dev_after: float

    def to_meta(self) -> dict[str, Any]:
        return {"version": CALIBRATION_VERSION, "kind": "label_bias", "biases": [float(b) for b in self.biases],
                "metric": self.metric, "dev_before": self.dev_before, "dev_after": self.dev_after}

    @classmethod
    def from_meta(cls, obj: Any, labels: Sequence[str] | None) -> "Calibration":
        """Read and validate the metadata object (raises :class:`CalibrationError`, one sentence)."""
        if not isinstance(obj, dict):
            raise CalibrationError("calibration must be an object")
        if obj.get("version") != CALIBRATION_VERSION or obj.get("kind") != "label_bias":
            raise CalibrationError(f"calibration version {obj.get('version')!r} kind {obj.get('kind')!r} is not "
                                   f"known (this softprompt reads version {CALIBRATION_VERSION}, label_bias)")
        b = obj.get("biases")
        if not isinstance(b, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b):
            raise CalibrationError("calibration biases must be a list of numbers")
        if not all(abs(float(x)) < 1e6 for x in b):
            raise CalibrationError("calibration biases must be finite")
        if labels is None or len(b) != len(labels):
            raise CalibrationError(f"calibration has {len(b)} biases for {len(labels or [])} labels")
        return cls(tuple(float(x) for x in b), str(obj.get("metric", "")), float(obj.get("dev_before", 0.0)),
                   float(obj.get("dev_after", 0.0)))


def biases_of(meta) -> torch.Tensor | None:
    """The (C,) biases a prompt file's metadata holds, or None (no calibration)."""
    obj = getattr(meta, "calibration", None)
    if obj is None:
        return None
    return torch.tensor(Calibration.from_meta(obj, meta.labels).biases, dtype=torch.float32)


def member_biases(metas: Sequence) -> torch.Tensor | None:
    """(k, C) biases of an ensemble's members (zeros for a member without calibration); None when
    no member is calibrated."""
    each = [biases_of(m) for m in metas]
    if all(b is None for b in each):
        return None
    C = next(len(b) for b in each if b is not None)
    return torch.stack([torch.zeros(C) if b is None else b for b in each])  # (k, C)


def apply(scores: torch.Tensor, biases: torch.Tensor | None) -> torch.Tensor:
    """Calibrated label log-probabilities: ``log_softmax(scores + biases)`` over the last dim (pure).

    Args:
        scores: (..., C) label log-probs (summed or normalised: the result is the same).
        biases: (C,) or broadcastable (k, C); None: no calibration (still normalised).
    """
    scores = scores.float()
    if biases is not None:
        scores = scores + biases.to(scores.device)  # (..., C)
    return torch.log_softmax(scores, dim=-1)


def _accuracy(pred: torch.Tensor, gold: torch.Tensor, n_labels: int) -> float:
    return float((pred == gold).float().mean())


def _macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_labels: int) -> float:
    f1s = []
    for c in range(n_labels):
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / n_labels


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {"accuracy": _accuracy, "macro_f1": _macro_f1}
"""Selection metrics the biases can be fitted to (higher is better)."""


def fit(logp: torch.Tensor, gold: Sequence[int], metric: str = "accuracy", grid: Sequence[float] = GRID,
        rounds: int = ROUNDS) -> Calibration:
    """Biases maximising ``metric`` of ``argmax(logp + b)`` on dev (pure, deterministic).

    Coordinate search: label 0 keeps bias 0 (a common shift changes nothing); each other label in
    turn takes the grid value that scores best, ties going to the smaller |b| (no move without a
    gain), for ``rounds`` passes. Args: logp (N, C) dev label log-probs; gold (N,) label indices.
    """
    if metric not in METRICS:
        raise ValueError(f"calibration fits {', '.join(METRICS)}, not {metric!r}")
    score = METRICS[metric]
    logp = logp.float()
    n, C = logp.shape
    g = torch.as_tensor(list(gold), dtype=torch.long)  # (N,)
    b = torch.zeros(C)

    def value(bias: torch.Tensor) -> float:
        return score((logp + bias).argmax(-1), g, C)

    before = best = value(b)
    for _ in range(rounds):
        moved = False
        for c in range(1, C):
            keep = float(b[c])
            for v in sorted(grid, key=abs):
                b[c] = v
                s = value(b)
                if s > best or (s == best and abs(v) < abs(keep)):
                    best, keep, moved = s, v, True
            b[c] = keep
        if not moved:
            break
    return Calibration(tuple(float(x) for x in b), metric, before, best)
