"""A request's life in the engine: the requests and results of the public API, and the
:class:`Job` that carries one request through the queue to exactly one outcome.

Not here: validation and tokenizing (admission.py, limits.py), scheduling (scheduler.py, batching.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ..calibration import apply as calibrate
from ..prefix import PrefixKV
from .batching import ensemble_probs
from .prefill import PrefixSlot
from .errors import EngineStoppedError, RequestCancelledError, RequestTimeoutError

log = logging.getLogger(__name__)


@dataclass
class ClassifyRequest:
    """Rank-classify ``text`` with one prompt, an ensemble of prompts, or the bare model.

    Args:
        text: the input, put into each prompt's template.
        prompts: prompt names; several = an ensemble (same labels; class probabilities averaged);
            empty = the bare model, which then needs ``labels`` (and optionally ``template``).
        labels, template: bare model only.
    """

    text: str
    prompts: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    template: str | None = None


@dataclass
class GenerateRequest:
    """Continue ``text`` with a prompt (its template applied) or the bare model (``prompt=None``).

    Args:
        temperature: 0 = greedy; else sampling, with nucleus ``top_p`` and an optional ``seed``
            (same seed, same tokens, whatever else shares the batch).
        stop: strings that end the generation (not included in the result).
    """

    text: str
    prompt: str | None = None
    max_new_tokens: int | None = None
    """None: 32, or ``--max-new-tokens`` if lower."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class ClassifyResult:
    label: str
    probs: dict[str, float]
    """Class probabilities (softmax of the summed label log-probs; averaged over an ensemble)."""
    scores: list[list[float]]
    """Summed log-probability of each label, per prompt (one list per ensemble member)."""
    prompts: list[str]

    @classmethod
    def of(cls, job: "Job", member: torch.Tensor) -> "ClassifyResult":
        """The answer to a classification job from its members' label scores ``member`` (k, C),
        whichever backend computed them: probabilities averaged over the ensemble."""
        # --calibrate: each member's label biases (softprompt.calibration); scores stay raw
        probs = ensemble_probs(member if job.biases is None else calibrate(member, job.biases))  # (C,)
        return cls(label=job.labels[int(probs.argmax())], probs={l: float(p) for l, p in zip(job.labels, probs)},
                   scores=member.tolist(), prompts=list(job.request.prompts))


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]
    prompt: str | None


Result = ClassifyResult | GenerateResult
Listener = Callable[[str, object], None]
"""Called from the worker thread with ("token", str delta), then ("done", Result) or ("error", exc)."""

OUTCOMES: dict[type, str] = {
    RequestTimeoutError: "timeout",
    RequestCancelledError: "cancelled",
    EngineStoppedError: "stopped",
}
"""The ``outcome`` label a failed job is counted under (ok: finished; queue_full: never queued;
anything else: error). HTTP: ok 200, timeout and stopped 503, queue_full 429, error 500,
cancelled: the client is gone and gets nothing."""


def outcome_of(error: BaseException) -> str:
    for cls in type(error).__mro__:
        if cls in OUTCOMES:
            return OUTCOMES[cls]
    return "error"


@dataclass
class Row:
    """One model row: a prompt prefix and a tokenized source (a job has one, an ensemble k)."""

    prefix: PrefixKV | None
    """None while the prompt's prefix is not computed yet: the worker fills ``slot`` (with the
    other missing prefixes of its step, in one batched pass) and sets it before the row is read."""
    source_ids: list[int]
    label_ids: tuple[tuple[int, ...], ...] | None = None
    slot: PrefixSlot | None = None
    """The prompt's prefix slot (prefill.py), shared by every row of that prompt's entry; None: the bare model."""

    @property
    def prefix_length(self) -> int:
        """P, known before the prefix is computed."""
        return self.slot.length if self.slot is not None else self.prefix.length


class Job:
    """A queued request: its rows, deadline and outcome. Finished exactly once."""

    def __init__(self, kind: str, request, rows: list[Row], labels: list[str] | None = None,
                 listener: Listener | None = None, cost: int | None = None):
        self.kind = kind
        self.request = request
        self.rows = rows
        self.tokens = sum(len(r.source_ids) for r in rows)
        self.cost = self.tokens if cost is None else cost
        """Share of ``--max-batch-tokens``: input tokens plus label tokens run (limits.classify_cost)."""
        self.labels = labels
        self.biases: torch.Tensor | None = None
        """(k, C) label-score calibration of a classification's members (None: none; set at admission)."""
        self.listener = listener
        self.generator: torch.Generator | None = None
        """Sampling generator of a generation job, seeded at admission."""
        self.on_outcome: Callable[["Job", str], None] | None = None
        """Called once, by whichever thread ends the job, with its outcome (set by the engine)."""
        self.submitted = time.monotonic()
        self.deadline = float("inf")
        self.started: float | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: Result | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the outcome; returns the result or raises the request's error."""
        if not self._done.wait(timeout):
            raise RequestTimeoutError(f"no result within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self, error: BaseException | None = None) -> None:
        """Give up on the request (client gone, caller timeout); it leaves the queue at once and the
        engine drops its rows at the next step."""
        self.fail(error or RequestCancelledError("request cancelled"))

    def emit(self, delta: str) -> None:
        if delta and not self.done:
            self._notify("token", delta)

    def finish(self, result: Result) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._result = result
            self._done.set()
        self._ended("ok")
        self._notify("done", result)
        return True

    def fail(self, error: BaseException) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._error = error
            self._done.set()
        self._ended(outcome_of(error))
        self._notify("error", error)
        return True

    def _ended(self, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(self, outcome)
            except Exception:
                log.warning("counting the outcome of a %s job failed", self.kind, exc_info=True)

    def _notify(self, kind: str, payload) -> None:
        if self.listener is None:
            return
        try:
            self.listener(kind, payload)
        except Exception:  # a listener's failure (e.g. its event loop closed) must not hit other rows
            log.warning("listener of a %s job failed on %r", self.kind, kind, exc_info=True)
