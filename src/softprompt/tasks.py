"""The task kinds as one registry: everything that differs between classification and generation
as data (template placeholder, default template, data fields and the flags that rename them,
metrics, primary metric, report columns), so that a new kind is one entry here.

The tables other modules used to keep (``data.PLACEHOLDERS``, ``DEFAULT_TEMPLATES``,
``DEFAULT_FIELDS``, ``FIELD_FLAGS``, ``evaluate.PRIMARY_METRIC``, ``baselines.COLUMNS``,
``report.COMPARED``) are views of :data:`TASKS`.

Not here: how a kind is trained or scored (train/objective.py, scoring.py, evaluate/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["classify", "generate"]


@dataclass(frozen=True)
class Task:
    """What one task kind is, as data."""

    name: str
    placeholder: str
    """The template placeholder of the source text (``{text}``, ``{input}``)."""
    template: str
    """The default template."""
    fields: tuple[str, str]
    """(source field, target field) in data files."""
    field_flags: tuple[str, str]
    """The CLI flags that rename the source and target fields."""
    labelled: bool
    """A fixed label set (rank classification) rather than free text."""
    primary_metric: str
    """The dev metric that picks the best prompt (early stopping)."""
    columns: tuple[tuple[str, str], ...]
    """Comparison table columns: (metric key, header)."""
    report_columns: tuple[tuple[str, str], ...]
    """Metrics plotted in the HTML report: (metric key, title)."""


TASKS: dict[str, Task] = {
    "classify": Task(
        "classify", placeholder="text", template="Text: {text}\nLabel:", fields=("text", "label"),
        field_flags=("--text-field", "--label-field"), labelled=True, primary_metric="accuracy",
        columns=(("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("log_loss", "log-loss")),
        report_columns=(("accuracy", "accuracy"), ("macro_f1", "macro-F1"))),
    "generate": Task(
        "generate", placeholder="input", template="Input: {input}\nOutput:", fields=("input", "output"),
        field_flags=("--input-field", "--output-field"), labelled=False, primary_metric="rouge_l",
        columns=(("exact_match", "exact"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")),
        report_columns=(("exact_match", "exact match"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF"))),
}
"""Task kind -> its :class:`Task`, in the order the CLI lists them."""

TASK_KINDS: tuple[str, ...] = tuple(TASKS)
