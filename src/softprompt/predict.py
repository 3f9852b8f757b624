"""Predicting with a prompt file: label + class probabilities, or generated text, as JSONL
(:class:`Predictor`; what ``softprompt predict`` and ``softprompt demo`` run).

Inputs are the TEXT arguments, the records of ``--data`` (any data source, see sources.py) or,
without either, the lines of stdin: JSON objects carrying the task's source field (``text`` /
``input``, or ``--field``) or plain text lines. Output is one JSON object
per input, in input order, written as each batch finishes.

Not here: the command line (commands/predict.py).
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field
from typing import Iterable, Iterator, TextIO

from .tasks import task
from .config_flags import flag
from .errors import ConfigError, DataError
from .scoring_config import ScoringConfig


@dataclass
class PredictConfig(ScoringConfig):
    """Settings of ``softprompt predict``: the shared scoring settings (scoring_config.py) and how
    generation samples. Each field is also its flag (config_flags.py)."""

    _: KW_ONLY
    source_field: str | None = field(default=None, metadata=flag("--field"))
    """Source field of JSON input lines (default: text / input)."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples (generate)."""
    top_p: float = 1.0
    """Nucleus sampling mass (generate)."""
    seed: int | None = None
    """Seed for sampling: input i (counting from 0) uses seed + i, whatever the batching."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Item:
    """One input: its text, an optional ``id`` carried to the output, where it came from."""

    text: str
    id: object = None
    where: str = ""


def parse_line(line: str, source_field: str, where: str) -> Item | None:
    """A stdin line as an input (pure): a JSON object with ``source_field``, or plain text;
    None for a blank line."""
    s = line.strip()
    if not s:
        return None
    if not s.startswith("{"):
        return Item(s, None, where)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}); plain-text lines must not start with '{{'") from None
    value = obj.get(source_field)
    if not isinstance(value, str):
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise DataError(f"{where}: field {source_field!r} is {what}")
    if not value.strip():
        raise DataError(f"{where}: field {source_field!r} is empty")
    return Item(value, obj.get("id"), where)


def read_items(texts: list[str], stream: TextIO, source_field: str) -> Iterator[Item]:
    """The TEXT arguments, or else the non-blank lines of ``stream``."""
    if texts:
        for i, t in enumerate(texts, 1):
            if not t.strip():
                raise DataError(f"TEXT argument {i} is empty")
            yield Item(t, None, f"argument {i}")
        return
    for i, line in enumerate(stream, 1):
        item = parse_line(line, source_field, f"stdin:{i}")
        if item is not None:
            yield item


def data_items(ref: str, source_field: str) -> list[Item]:
    """``--data``: the inputs of a file, saved dataset or ``hf:`` dataset (see sources.py), read and
    checked before any model loads; an ``id`` field is carried to the output."""
    from .data import text_value
    from .sources import open_table

    table = open_table(ref, default_split=None)
    table.check_field(source_field, "--field")
    wanted = [source_field] + (["id"] if table.fields is not None and "id" in table.fields else [])
    items = [Item(text_value(row, source_field, table.where(n)), row.get("id"), table.where(n))
             for n, row in table.read(wanted)]
    if not items:
        raise DataError(f"{table.name}: no inputs")
    return items


def chunks(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    """Consecutive groups of ``n`` (the last may be shorter), read lazily."""
    buf: list[Item] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


class Predictor:
    """A loaded prompt on its base model, predicting batches of texts."""

    def __init__(self, config: PredictConfig, base=None):
        from .artifact import check_compatible, load_prompt
        from .calibration import biases_of
        from .base import load_base_model
        from .devices import resolve_device
        from .model import PromptedModel
        from .precision import resolve_precision
        from .evaluate.compare import trained_spec

        loaded = load_prompt(config.prompt)
        self.meta = loaded.meta
        self.spec = trained_spec(self.meta, config.max_length)
        self.config = config
        self.base = base if base is not None else load_base_model(config.model, device=resolve_device(config.device))
        check_compatible(self.meta, self.base, config.prompt, strict=not config.allow_other_base)
        self.pm = PromptedModel(self.base)
        self.prompt = loaded.tensor.to(self.base.device)  # (P, d), or deep (layers, 2, H, P, hd)
        self.amp = resolve_precision(config.precision, self.base.device)  # None: fp32
        self.biases = biases_of(self.meta)  # (C,) label calibration, or None
        self.done = 0  # inputs predicted so far (offsets the per-input seeds)

    @property
    def source_field(self) -> str:
        return self.config.source_field or task(self.spec.kind).fields[0]

    def predict(self, texts: list[str]) -> list[dict]:
        """Predictions of one batch: ``{"label", "probs"}`` (classify) or ``{"output", "finish_reason"}``."""
        from .precision import autocast

        with autocast(self.base.device, self.amp):
            return self._predict(texts)

    def _predict(self, texts: list[str]) -> list[dict]:
        out = task(self.spec.kind).predict(self, texts)  # the kind answers: a label or a generation
        self.done += len(texts)
        return out


def predict_stream(predictor: Predictor, items: Iterable[Item], out: TextIO, total: int | None = None) -> int:
    """Predict ``items`` batch by batch, writing one JSON line each; returns how many. A progress
    bar on stderr counts the inputs (of ``total`` when known) while progress is shown."""
    from . import progress

    n = 0
    with progress.bar(total, desc="predict", unit="input") as shown:
        for batch in chunks(items, predictor.config.batch_size):
            with progress.shown(False):  # one bar for the stream, none per batch
                preds = predictor.predict([it.text for it in batch])
            for item, pred in zip(batch, preds):
                row = {"id": item.id, **pred} if item.id is not None else pred
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            n += len(batch)
            shown.update(len(batch))
    return n
