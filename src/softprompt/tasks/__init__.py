"""The task kinds: one :class:`Task` entry per kind, holding what the code that reads data,
trains, evaluates, predicts and serves needs to know about it.

- ``classify``: rank classification over a fixed label set (``classify.py``);
- ``generate``: text generation after the input, scored by ROUGE-L (``generate.py``).

Code outside this package asks the entry (``task(spec.kind).evaluate(...)``) instead of comparing
kind names (``tests/test_taskkinds.py`` keeps it so): a new kind is one entry here plus its own
module. The tables other modules keep (``evaluate.PRIMARY_METRIC``, ``baselines.COLUMNS``,
``report.COMPARED``) are views of :data:`TASKS`.

Not here: the contract itself (task.py), what the kinds share (shared.py), how an example becomes
tokens (data.TaskSpec, which asks its kind).
"""

from __future__ import annotations

from typing import Literal

from ..errors import ConfigError
from .classify import CLASSIFY
from .generate import GENERATE
from .task import Serving, Task

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFY, GENERATE)}
"""Task kind -> its :class:`Task`, in the order the CLI lists them; the first is the default."""

TaskKind = Literal["classify", "generate"]
"""The kinds' names as a type (``tests/test_taskkinds.py`` keeps it equal to :data:`TASKS`' keys)."""

TASK_KINDS: tuple[str, ...] = tuple(TASKS)

__all__ = ["TASKS", "TASK_KINDS", "Serving", "Task", "TaskKind", "task", "labelled_kind"]


def task(name: object, where: str | None = None, error: type[Exception] = ConfigError) -> Task:
    """The entry of kind ``name``; ``error`` (one line, naming ``where`` and the choices) when there is none."""
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    head = f"{where}: " if where else ""
    raise error(f"{head}unknown task {name!r}; choose one of {', '.join(TASKS)}")


def labelled_kind(labelled: bool) -> Task:
    """The first kind with (or without) a label set: what a task is taken to be when only that is
    known (an imported PEFT adapter given ``--labels``; ``row_losses`` given label ids or None)."""
    return next(t for t in TASKS.values() if t.labelled == labelled)
