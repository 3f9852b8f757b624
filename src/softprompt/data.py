"""Data: records -> examples, task specs (template + labels/verbalizer), and how text becomes tokens.

One :class:`TaskSpec` decides how an example's text is rendered and tokenized and what the target
tokens are. Training, evaluation, prediction and serving all go through it, so a prompt is scored
exactly the way it was trained.

Not here: reading files and datasets into records (sources.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import DataError
from .sources import Table, open_table
from .tasks import TaskKind, task

@dataclass
class Example:
    """One labelled example: ``source`` (text / input) and ``target`` (label / output)."""

    source: str
    target: str
    line: int = 0
    """Line number in the file it came from (1-based; 0 when not from a file); row number for tables."""
    where: str = field(default="", compare=False)
    """Where it came from, for messages (``file:line``, ``source, row N``); empty when not read from data."""

    def locate(self, source: str) -> str:
        """``where``, else ``source:line``."""
        return self.where or f"{source}:{self.line}"


@dataclass
class TaskSpec:
    """How a task turns an example into tokens.

    Args:
        kind: a task kind of :data:`softprompt.tasks.TASKS`: "classify" (rank classification over
            ``labels``) or "generate"; its entry checks the rest of the spec.
        template: text around the example, with the kind's placeholder (``{text}`` for classify,
            ``{input}`` for generate); default: the kind's template.
        labels: class labels, in score order (classify only).
        verbalizer: label -> words the model must produce; default: the label itself.
        max_length: most source tokens (template included); longer texts are cut.
        max_target_length: most target tokens for generation (EOS included).
    """

    kind: TaskKind
    template: str | None = None
    labels: list[str] | None = None
    verbalizer: dict[str, str] | None = None
    max_length: int = 256
    max_target_length: int = 64

    def __post_init__(self) -> None:
        kind = task(self.kind, error=DataError)
        if self.template is None:
            self.template = kind.template
        ph = "{" + kind.placeholder + "}"
        if self.template.count(ph) != 1:
            raise DataError(f"template {self.template!r} must contain {ph} exactly once")
        if self.max_length < 8:
            raise DataError(f"--max-length must be at least 8, got {self.max_length}")
        kind.check_spec(self)

    @property
    def placeholder(self) -> str:
        return task(self.kind).placeholder

    @property
    def words(self) -> list[str]:
        """The verbalized words of each label, in label order."""
        verb = self.verbalizer or {}
        return [verb.get(label, label) for label in self.labels or []]

    def render(self, text: str) -> str:
        """The template with the example in place (only the placeholder is replaced)."""
        return self.template.replace("{" + self.placeholder + "}", text)

    def _lead(self) -> str:
        """Targets start with a space unless the template already ends in whitespace."""
        return "" if self.template[-1:].isspace() else " "

    def source_ids(self, tokenizer, text: str) -> list[int]:
        """Token ids of the rendered source, the text cut so the whole fits ``max_length``."""
        ids = tokenizer(self.render(text), add_special_tokens=True)["input_ids"]
        if len(ids) <= self.max_length:
            return list(ids)
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = max(1, len(text_ids) - (len(ids) - self.max_length))
        for _ in range(4):  # decoding then re-tokenizing can shift a token or two
            cut = tokenizer.decode(text_ids[:budget])
            ids = tokenizer(self.render(cut), add_special_tokens=True)["input_ids"]
            if len(ids) <= self.max_length:
                return list(ids)
            budget = max(1, budget - (len(ids) - self.max_length))
        return list(ids[-self.max_length :])

    def label_ids(self, tokenizer) -> list[list[int]]:
        """Token ids of each label's words as a continuation of the source (classify)."""
        out = []
        for word in self.words:
            ids = tokenizer(self._lead() + word, add_special_tokens=False)["input_ids"]
            if not ids:
                raise DataError(f"label words {word!r} tokenize to nothing")
            out.append(list(ids))
        return out

    def target_ids(self, tokenizer, output: str) -> list[int]:
        """Token ids of a generation target, EOS-terminated, cut to ``max_target_length``."""
        ids = tokenizer(self._lead() + output, add_special_tokens=False)["input_ids"]
        ids = list(ids[: self.max_target_length - 1])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids

    def to_meta(self) -> dict:
        """The fields a prompt file records (``PromptMeta`` keyword arguments)."""
        return {"task": self.kind, "template": self.template, "labels": self.labels,
                "verbalizer": self.verbalizer or None}

    @classmethod
    def from_meta(cls, meta, max_length: int = 256) -> "TaskSpec":
        """The spec a prompt file was trained with."""
        if meta.task is None:
            raise DataError("the prompt file does not name its task type")
        return cls(kind=meta.task, template=meta.template, labels=meta.labels, verbalizer=meta.verbalizer,
                   max_length=max_length)


# ----------------------------------------------------------------------------- files


def text_value(row: dict, key: str, where: str) -> str:
    """The non-empty text of ``row[key]`` (numbers as text); DataError naming ``where`` otherwise."""
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    v = row[key]
    if isinstance(v, (dict, list)):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    v = str(v)
    if not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _field_value(table: Table, row: dict, key: str, where: str) -> object:
    """A typed source's value: ClassLabel ids become their names (-1, no label, counts as missing)."""
    v = row.get(key)
    names = table.class_names.get(key)
    if names is not None and isinstance(v, int) and not isinstance(v, bool):
        if v == -1:
            raise DataError(f"{where}: field {key!r} has no label (class id -1, as in unlabelled test splits)")
        if not 0 <= v < len(names):
            raise DataError(f"{where}: field {key!r} has class id {v}, outside its {len(names)} names")
        return names[v]
    return v


def load_examples(
    path: str | Path,
    kind: TaskKind,
    source_field: str | None = None,
    target_field: str | None = None,
    *,
    require_target: bool = True,
    default_split: str | None = "train",
) -> list[Example]:
    """Read labelled examples from a data reference: a JSONL, CSV/TSV or Parquet file, a folder
    saved by ``datasets``, or ``hf:NAME[/CONFIG][:SPLIT]`` (see :mod:`softprompt.sources`).

    Args:
        kind: the task kind; picks the default field names ("text"/"label" or "input"/"output").
        source_field, target_field: other field names.
        require_target: False for unlabelled input (prediction).
        default_split: the split of a dataset with several when ``path`` names none (None: it must).
    Raises:
        DataError naming file and line (or row): unreadable, malformed, missing or empty field, empty
        file; for typed sources also a missing column, a missing split, integer labels without names.
    """
    t = task(kind, error=DataError)
    table = open_table(path, default_split)
    sf, tf = source_field or t.fields[0], target_field or t.fields[1]
    flags = t.field_flags
    table.check_field(sf, flags[0])
    if require_target:
        table.check_field(tf, flags[1])
    if t.labelled and tf in table.integer_fields:
        raise DataError(f"{table.name}: field {tf!r} holds integer class ids without names; store the label "
                        "names (strings) or cast the column to a datasets ClassLabel with names")
    wanted = [f for f in (sf, tf) if table.fields is None or f in table.fields]
    out = []
    try:
        for line, row in table.read(wanted):
            where = table.where(line)
            if table.fields is not None:
                row = {k: _field_value(table, row, k, where) for k in wanted}
            target = text_value(row, tf, where) if require_target else str(row.get(tf) or "")
            if t.labelled:
                target = target.strip()
            out.append(Example(text_value(row, sf, where), target, line, where))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not out:
        raise DataError(f"{table.name}: no examples (empty {'file' if table.unit == 'line' else 'data set'})")
    return out


def labels_of(examples: Sequence[Example]) -> list[str]:
    """The sorted set of labels in a classification data set."""
    return sorted({ex.target for ex in examples})


def check_classification(train: Sequence[Example], eval_: Sequence[Example] | None, labels: Sequence[str],
                         eval_name: str = "eval set") -> None:
    """Refuse single-class training sets and eval labels never seen in training."""
    seen = {ex.target for ex in train}
    if len(seen) < 2:
        raise DataError(f"the training set has a single class ({next(iter(seen))!r}); need at least 2")
    unknown = [l for l in seen if l not in labels]
    if unknown:
        raise DataError(f"training labels {sorted(unknown)} are not in the label set {list(labels)}")
    for ex in eval_ or []:
        if ex.target not in labels:
            raise DataError(f"{ex.locate(eval_name)}: label {ex.target!r} never seen in training ({', '.join(labels)})")


def split_examples(examples: Sequence[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of ``examples`` (seeded shuffle); returns (train, held-out)."""
    if not 0 < fraction < 1:
        raise DataError(f"--eval-split must be between 0 and 1, got {fraction}")
    items = list(examples)
    random.Random(seed).shuffle(items)
    n = max(1, round(len(items) * fraction))
    if n >= len(items):
        raise DataError(f"--eval-split {fraction} leaves no training examples out of {len(items)}")
    return items[n:], items[:n]


def parse_verbalizer(value: str | None) -> dict[str, str] | None:
    """``--verbalizer``: a JSON file or object, or ``label=words,label=words``."""
    if not value:
        return None
    text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"--verbalizer: malformed JSON ({e.msg})") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise DataError("--verbalizer: JSON must map label strings to word strings")
        return obj
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise DataError(f"--verbalizer: expected label=words, got {part.strip()!r}")
        k, v = part.split("=", 1)
        if k.strip() in out:
            raise DataError(f"--verbalizer: label {k.strip()!r} given twice")
        out[k.strip()] = v.strip()
    return out
