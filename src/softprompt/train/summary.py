"""The training summary: what the run that made a prompt file did, stored in the file's metadata
(``training``), written once by the loop and read by name.

Not here: the metrics log (records.py), the prompt file itself (artifact/).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

StoppedBy = Literal["on_eval", "early_stopping", "time"]


@dataclass
class TrainingSummary:
    """A prompt file's ``training`` metadata (JSON keys = field names, in this order)."""

    steps: int
    """Optimizer steps done."""
    planned_steps: int
    examples: int
    """Training rows processed, all processes."""
    train_examples: int
    dev_examples: int
    train_file: str
    dev_file: str | None
    best_step: int
    """The step whose prompt was saved."""
    metric: str | None
    """The dev metric that picked it (None without dev data)."""
    best_metric: float | None
    dev_metrics: dict | None
    stopped_early: bool
    stopped_by: StoppedBy | None
    """Why the run ended before its planned steps (None: it did not)."""
    max_time: float | None
    seconds: float
    examples_per_s: float
    processes: int
    precision: str
    tasks_in_run: int
    config: dict
    """The run's settings (``TrainConfig.result_settings()``)."""
    balance: dict
    gradient_checkpointing: bool
    calibrated: bool
    sharded_base: dict | None = None
    """Only when the base was sharded over the processes."""
    search: dict | None = None
    """Only for the winner of ``softprompt tune``."""

    def to_meta(self) -> dict[str, Any]:
        """The JSON object stored in the prompt file (the optional parts only when set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("sharded_base", "search"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_meta(cls, training: dict | None) -> "TrainingSummary":
        """Read a stored summary by name; what a file from another version lacks is None."""
        training = training or {}
        return cls(**{f.name: training.get(f.name) for f in fields(cls)})
