"""What a run reports: ``metrics.jsonl`` (:class:`MetricsLog`, also fed to the experiment trackers)
and the :class:`TrainResult` returned to the caller.

Not here: the trackers (tracking.py), checkpoints (checkpoint.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifact import atomic_write_bytes
from .tracking import Trackers


def peak_rss_mb() -> float | None:
    """This process's peak resident host memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # macOS reports bytes


@dataclass
class TrainResult:
    """What a run produced."""

    paths: dict[str, Path]
    """Task name -> prompt file written."""
    run_dir: Path
    steps: int
    """Optimizer steps done (fewer than planned after early stopping)."""
    examples: int
    """Training examples processed (rows, all processes)."""
    seconds: float
    """Wall time of the training loop (evaluation included)."""
    examples_per_s: float
    """Training throughput (evaluation and checkpoint time excluded)."""
    metrics: dict[str, dict] = field(default_factory=dict)
    """Task name -> dev metrics of the saved prompt (empty without a dev set)."""
    best_step: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """Every record of metrics.jsonl."""
    stopped_early: bool = False
    out_of_time: bool = False
    """The --max-time budget stopped the run before its planned steps."""

    @property
    def path(self) -> Path:
        """The prompt file (the first task's, for several tasks)."""
        return next(iter(self.paths.values()))


@dataclass(frozen=True)
class DevResult:
    """One dev evaluation during training, as ``train(on_eval=...)`` sees it (main process)."""

    step: int
    """Optimizer steps done when it was evaluated."""
    metrics: dict[str, dict]
    """Task name -> its dev metrics at this step (tasks with a dev set)."""
    select_metric: dict[str, str]
    """Task name -> the dev metric that keeps its best prompt (--select-metric, resolved)."""

    def score(self, task: str) -> float:
        """``task``'s value of its select metric at this step."""
        return float(self.metrics[task][self.select_metric[task]])


EvalHook = Callable[[DevResult], bool]
"""``train(on_eval=...)``: called after every dev evaluation; returning True stops the run there, as
early stopping would (the best dev prompt so far is written; ``stopped_by`` is ``"on_eval"``)."""


class MetricsLog:
    """``metrics.jsonl``: one JSON record per step and per evaluation, appended as they happen."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict] = []
        self.sink: Trackers | None = None
        """Experiment trackers: every appended record goes to them too (tracking.py)."""

    def restore(self, upto_step: int) -> None:
        """Keep the records of steps <= ``upto_step`` (a resumed run rewrites what came after)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and rec.get("step", 0) <= upto_step:
                keep.append(rec)
        self.records = keep
        if self.enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def start(self) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.sink:
                self.sink.log(record)

    def close(self, status: str = "FINISHED") -> None:
        """End the trackers' runs (FINISHED, FAILED or KILLED); metrics.jsonl needs no closing."""
        if self.sink:
            self.sink.close(status)
