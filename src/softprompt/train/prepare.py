"""The data a run's settings point at, read and checked before any model loads (so bad input fails
at once): each task's examples, labels, splits and spec; the data fingerprint a resume is checked
against; the planned number of steps.

Not here: the settings themselves (config.py), the model and prompts (setup.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data import Example, TaskSpec, check_classification, labels_of, load_examples, split_examples
from ..errors import ConfigError, DataError
from ..tasks import task
from .config import DEFAULT_MAX_STEPS, TrainConfig
from .task_config import TaskConfig
from .budget import auto_steps
from .schedule import steps_per_epoch


@dataclass
class PreparedTask:
    """A task's checked data and spec; built before the model loads."""

    config: TaskConfig
    spec: TaskSpec
    train: list[Example]
    dev: list[Example] | None
    out: Path

    @property
    def name(self) -> str:
        return self.config.name


def prepare(config: TrainConfig) -> list[PreparedTask]:
    """Read and check every task's data (files, labels, splits, templates). Raises DataError or
    ConfigError naming file, line and problem; loads no model."""
    out = []
    for tc in config.tasks_resolved:
        train_ex = load_examples(tc.data, tc.task, tc.source_field, tc.target_field)
        dev = None
        if tc.eval:
            dev = load_examples(tc.eval, tc.task, tc.source_field, tc.target_field, default_split=None)
        elif tc.eval_split is not None:
            train_ex, dev = split_examples(train_ex, tc.eval_split, config.seed)
        labels = None
        if task(tc.task).labelled:
            labels = tc.labels or labels_of(train_ex)
            check_classification(train_ex, dev, labels, eval_name=str(tc.eval or tc.data))
        spec = TaskSpec(kind=tc.task, template=tc.template, labels=labels, verbalizer=tc.verbalizer or None,
                        max_length=config.max_length, max_target_length=config.max_target_length)
        path = Path(tc.out) if tc.out else Path(config.out) / f"{tc.name}.safetensors"
        out.append(PreparedTask(tc, spec, train_ex, dev, path))
    n = sum(len(t.train) for t in out)
    if n < config.batch_size:
        files = ", ".join(str(t.config.data) for t in out)
        raise DataError(f"--batch-size {config.batch_size} is larger than the training set ({n} examples in {files})")
    paths = [t.out.resolve() for t in out]
    if len(set(paths)) != len(paths):
        raise ConfigError("two tasks would write the same prompt file; give each an own name or out")
    return out


def data_fingerprint(tasks: Sequence[PreparedTask]) -> str:
    """Hash of every task's training examples, labels and template (resume refuses other data)."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(json.dumps([t.name, t.spec.kind, t.spec.template, t.spec.labels, t.spec.words]).encode())
        for ex in t.train:
            h.update(ex.source.encode() + b"\0" + ex.target.encode() + b"\1")
    return h.hexdigest()[:16]


def total_steps(config: TrainConfig, n_examples: int) -> int:
    if config.max_steps == "auto":
        return auto_steps(n_examples, config.batch_size, config.max_time)
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * steps_per_epoch(n_examples, config.batch_size)))
    return DEFAULT_MAX_STEPS
