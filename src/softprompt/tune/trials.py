"""What a search records: one :class:`TrialRecord` per trial, appended to ``trials.jsonl`` in the run
folder as trials finish (JSON, no pickle), the choice of the winner (a pure function) and the
:class:`TuneResult` returned to the caller.

Not here: running trials (search.py), the prompt files (artifact/).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence


@dataclass
class TrialRecord:
    """One trial of the search, as trials.jsonl holds it."""

    number: int
    """0-based, in the order the trials ran."""
    state: Literal["complete", "pruned"]
    """pruned: the pruner stopped it on a dev evaluation (its best prompt so far is kept all the same)."""
    params: dict
    """The recipe: method (a name of SEARCH_METHODS), lr, prompt_length."""
    metric: str
    """The dev metric trials are compared by (the select metric train keeps the best prompt by)."""
    value: float
    """The trial's best dev value of ``metric`` (its saved prompt's)."""
    best_step: int
    evals: list[dict] = field(default_factory=list)
    """Every dev evaluation: {"step", "value"}."""
    steps: int = 0
    """Optimizer steps run."""
    planned_steps: int = 0
    max_time: float = 0.0
    """The trial's share of the budget (s)."""
    seconds: float = 0.0
    """Wall time of the trial (s)."""
    loop_seconds: float = 0.0
    """Of which in the training loop, evaluations included (what its share limits; the rest is reading
    and tokenizing the data, and writing its prompt)."""
    step_seconds: float = 0.0
    """Measured seconds of one training step (the next trials of this method are planned with it)."""
    eval_seconds: float = 0.0
    """Measured seconds of one dev evaluation (likewise)."""
    stopped_by: str | None = None
    """None (ran its planned steps), "time" (its share), "early_stopping" (--patience) or "on_eval" (pruned)."""
    prompt: str = ""
    """The trial's prompt file."""

    def to_json(self) -> dict:
        return asdict(self)


def best_trial(records: Sequence[TrialRecord], direction: int) -> TrialRecord:
    """The trial with the best dev value (``direction`` -1: lower is better), pruned trials included
    (their prompt is the best they reached); ties go to the earlier trial (pure)."""
    if not records:
        raise ValueError("no trials")
    return max(records, key=lambda r: (direction * r.value, -r.number))


class TrialLog:
    """``trials.jsonl``: one JSON object per finished trial, appended as it finishes."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def append(self, record: TrialRecord) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")


def read_trials(path: str | Path) -> list[dict]:
    """The records of a trials.jsonl (for reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class TuneResult:
    """What a search produced."""

    path: Path
    """The winner's prompt file (--out)."""
    run_dir: Path
    """trials.jsonl and one folder per trial."""
    best: TrialRecord
    trials: list[TrialRecord]
    seconds: float
    """Wall time of the search, model loading included."""
    stopped_by: Literal["trials", "budget"]
    """What ended the search: every trial ran, or the budget was spent (an interrupted search raises
    KeyboardInterrupt after writing its winner, ``training.search.stopped_by`` "interrupted")."""
    search: dict = field(default_factory=dict)
    """The summary written into the prompt file's training metadata (``training.search``)."""
