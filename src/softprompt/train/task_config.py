"""One task's settings, stated once: :class:`TaskFields` are both a ``--task-file`` entry's keys
(:class:`TaskConfig`) and the single-task flags of ``softprompt train`` (``TrainConfig`` inherits
them), and :func:`load_task_file` reads a task file.

Not here: the run's settings (config.py), reading the data (prepare.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..config_flags import flag
from ..data import parse_verbalizer
from ..errors import ConfigError
from ..methods import METHODS
from ..sources import is_hub_ref
from ..tasks import TASK_KINDS, TaskKind, task


def unescape(template: str) -> str:
    """``--template``: "\\n" and "\\t" typed in a shell become a newline and a tab (pure)."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def _template_flag(value: str | None, _: argparse.Namespace) -> str | None:
    return unescape(value) if value else None


def _labels_flag(value: str | None, _: argparse.Namespace) -> list[str] | None:
    """``--labels a,b,c`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [l.strip() for l in value.split(",") if l.strip()] if value else None


def _out_flag(value: str | None, args: argparse.Namespace) -> str:
    """``--out``: required, except with ``--task-file`` (then the folder ``prompts``)."""
    if value:
        return value
    if getattr(args, "task_file", None):
        return "prompts"
    raise ConfigError("--out is required (the prompt file to write)")


@dataclass(kw_only=True)
class TaskFields:
    """The settings of one task: its data, how examples become tokens, where its prompt goes."""

    data: str | None = field(default=None, metadata=flag(group="data and task"))
    """Training data: .jsonl, .csv, .parquet, a folder saved by datasets (FOLDER[:SPLIT]), or a Hugging Face
    dataset hf:NAME[/CONFIG][:SPLIT] (split default: train)."""
    task: TaskKind = "classify"
    """Task type: "classify" (rank classification over the labels) or "generate"."""
    out: str | None = None
    """Prompt file (default: <out dir>/<name>.safetensors)."""
    name: str | None = None
    """Task name, recorded in the prompt file and the key in logs (default: --out's name without suffix)."""
    eval: str | None = None
    """Dev data, in any form --data takes (a dataset with several splits must name one, e.g.
    hf:glue/sst2:validation): early stopping keeps the best prompt on it."""
    eval_split: float | None = None
    """Or hold out this fraction of the training data as the dev set."""
    template: str | None = field(default=None, metadata=flag(convert=_template_flag))
    """Text around each example, with {text} (classify) or {input} (generate); on the command line \\n and \\t
    are read as newline and tab, e.g. "Text: {text}\\nTopic:" (default: "Text: {text}\\nLabel:" or
    "Input: {input}\\nOutput:")."""
    labels: list[str] | None = field(default=None, metadata=flag(convert=_labels_flag))
    """Explicit label order, comma-separated on the command line (default: the sorted training labels)."""
    verbalizer: dict[str, str] | str | None = None
    """Label words: "label=words,...", or JSON (text or file), or a dict (Python)."""
    source_field: str | None = field(default=None, metadata=flag("--text-field", "--input-field"))
    """Field holding the text (classify: --text-field, default: text) or the input (generate: --input-field,
    default: input)."""
    target_field: str | None = field(default=None, metadata=flag("--label-field", "--output-field"))
    """Field holding the label (classify: --label-field, default: label) or the output (generate: --output-field,
    default: output)."""
    init_text: str | None = field(default=None, metadata=flag(group="prompt and optimisation"))
    """Text for --init text."""


PER_TASK = tuple(f.name for f in fields(TaskFields) if f.name not in ("data", "task", "out", "name", "init_text"))
"""Settings that belong in the task file when a run trains several tasks."""


@dataclass(kw_only=True)
class TaskConfig(TaskFields):
    """One task of a run (an entry of ``--task-file``): :class:`TaskFields`, with a name and data
    required, and its own prompt length and method if they differ from the run's."""

    name: str
    """Short name: the prompt file's name and the key in logs."""
    data: str
    """Training data: .jsonl, .csv, .parquet, a folder saved by datasets, or ``hf:NAME[/CONFIG][:SPLIT]``."""
    prompt_length: int | None = None
    """Virtual tokens of this task's prompt (default: the run's --prompt-length)."""
    method: Literal["prompt", "prefix"] | None = None
    """This task's prompt method (default: the run's --method), so one run can mix them."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip() or any(c in self.name for c in "/\\\0"):
            raise ConfigError(f"task name {self.name!r} must be non-empty and contain no slashes")
        if self.task not in TASK_KINDS:
            raise ConfigError(f"--task {self.task!r}: choose one of {', '.join(TASK_KINDS)}")
        if self.eval and self.eval_split is not None:
            raise ConfigError("give either --eval or --eval-split, not both")
        if self.eval_split is not None and not 0 < self.eval_split < 1:
            raise ConfigError(f"--eval-split must be between 0 and 1, got {self.eval_split}")
        if isinstance(self.verbalizer, str):
            self.verbalizer = parse_verbalizer(self.verbalizer)
        if self.labels is not None:
            if not isinstance(self.labels, list) or not all(isinstance(l, str) and l.strip() for l in self.labels):
                raise ConfigError("--labels must be a list of non-empty label names")
            self.labels = [l.strip() for l in self.labels]
        if not task(self.task).labelled and (self.labels or self.verbalizer):
            raise ConfigError("--labels and --verbalizer only apply to --task classify")
        if self.prompt_length is not None and self.prompt_length < 1:
            raise ConfigError(f"--prompt-length must be at least 1, got {self.prompt_length}")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")


TASK_FILE_KEYS = {f.name for f in fields(TaskConfig)}


def load_task_file(path: str | Path) -> list[TaskConfig]:
    """``--task-file``: JSON ``{"tasks": [{...}, ...]}`` (or a bare list) of :class:`TaskConfig`
    fields; relative paths are relative to the task file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--task-file: no such file {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--task-file {p}: malformed JSON ({e.msg} at line {e.lineno})") from None
    items = obj.get("tasks") if isinstance(obj, dict) else obj
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--task-file {p}: expected a non-empty list of tasks under \"tasks\"")
    out = []
    for i, item in enumerate(items):
        where = f"--task-file {p}: task {i + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = sorted(set(item) - TASK_FILE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(TASK_FILE_KEYS)}")
        for key in ("name", "data"):
            if key not in item:
                raise ConfigError(f"{where}: missing {key!r}")
        item = dict(item)
        for key in ("data", "eval", "out"):
            if item.get(key) and not Path(item[key]).is_absolute() and not is_hub_ref(item[key]):
                item[key] = str(p.parent / item[key])
        if isinstance(item.get("verbalizer"), str) and not item["verbalizer"].lstrip().startswith("{"):
            vf = p.parent / item["verbalizer"]
            if vf.is_file():
                item["verbalizer"] = str(vf)
        try:
            out.append(TaskConfig(**item))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--task-file {p}: duplicate task name(s) {dup}")
    return out
