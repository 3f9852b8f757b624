"""Data sources: a data reference (a file, a folder saved by ``datasets``, a Hugging Face dataset id)
-> numbered records, with the field types the format declares.

A reference is one string, as ``--data`` / ``--eval`` take it:

- ``train.jsonl`` / ``.json`` / ``.ndjson``, ``train.csv``, ``train.tsv``: records numbered by file line;
- ``train.parquet``: rows (needs ``pyarrow``; ``softprompt[parquet]``);
- a folder written by ``datasets.Dataset.save_to_disk``, or by ``DatasetDict.save_to_disk`` with the
  split named as ``FOLDER:SPLIT`` (or as its subfolder ``FOLDER/SPLIT``);
- ``hf:NAME[/CONFIG][:SPLIT]``: a Hugging Face dataset, loaded by ``datasets.load_dataset`` with its
  cache (``softprompt[datasets]``); NAME is ``name`` or ``owner/name``, so ``hf:a/b`` is the dataset
  ``a/b`` if there is one, else the dataset ``a`` with config ``b``.

Typed sources (Parquet, ``datasets``) declare their fields up front, so a missing field is refused
before a single row is read, and integer class ids come with their names (``ClassLabel``) or are
refused. The readers form the registry :data:`FILE_FORMATS` (files, by suffix) plus the two
``datasets`` readers.

Not here: turning records into examples and checking their values (data.py).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import DataError
from .extras import require

HUB_PREFIX = "hf:"
"""Prefix of a Hugging Face dataset id in a data reference."""

Records = Iterator[tuple[int, dict]]


@dataclass
class Table:
    """The records of one data source.

    Args:
        name: how messages name the source (the path, or the dataset id with its split).
        unit: "line" (record numbers are file lines) or "row" (1-based row numbers).
        fields: the fields every record has, when the format declares them (None: JSONL/CSV, per record).
        class_names: field -> names of its integer class ids (a ``datasets.ClassLabel``).
        integer_fields: integer fields without names.
        read: records restricted to the given fields (typed sources read only those columns).
    """

    name: str
    unit: str
    read: Callable[[Sequence[str]], Records]
    fields: list[str] | None = None
    class_names: dict[str, list[str]] = field(default_factory=dict)
    integer_fields: frozenset[str] = frozenset()

    def where(self, number: int) -> str:
        """Where a record is, for messages: ``file:line`` or ``source, row N``."""
        return f"{self.name}:{number}" if self.unit == "line" else f"{self.name}, row {number}"

    def check_field(self, name: str, flag: str) -> None:
        """Refuse a field a typed source does not have (naming the fields it has and the flag)."""
        if self.fields is not None and name not in self.fields:
            raise DataError(f"{self.name}: no field {name!r} (fields: {', '.join(self.fields) or 'none'}); "
                            f"name the right one with {flag}")


def is_hub_ref(ref: str | Path) -> bool:
    """True for ``hf:NAME...`` references (not paths: never made relative to a task file)."""
    return str(ref).startswith(HUB_PREFIX)


# ----------------------------------------------------------------------------- JSONL, CSV


def jsonl_objects(path: Path) -> Records:
    """(line number, object) of each non-blank line of a JSONL file; DataError names file:line.
    Data files and training logs (report.py) alike."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def _jsonl(path: Path) -> Table:
    return Table(str(path), "line", lambda _fields: jsonl_objects(path))


def _delimited(delimiter: str) -> Callable[[Path], Table]:
    def open_(path: Path) -> Table:
        def read(_fields: Sequence[str]) -> Records:
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                try:
                    for row in reader:
                        if None in row:
                            raise DataError(f"{path}:{reader.line_num}: more fields than the header has")
                        yield reader.line_num, row
                except csv.Error as e:
                    raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None

        return Table(str(path), "line", read)

    return open_


# ----------------------------------------------------------------------------- typed tables (Arrow)


def _columns(columns: dict[str, list], n: int) -> Records:
    """Rows (1-based) of column lists."""
    keys = list(columns)
    for i in range(n):
        yield i + 1, {k: columns[k][i] for k in keys}


def _hf_class_names(metadata: dict | None) -> dict[str, list[str]]:
    """ClassLabel names from the ``huggingface`` schema metadata ``datasets`` writes into Parquet."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        feats = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    return {k: list(v["names"]) for k, v in feats.items()
            if isinstance(v, dict) and v.get("_type") == "ClassLabel" and isinstance(v.get("names"), list)}


def _parquet(path: Path) -> Table:
    require("parquet", f"{path}: reading Parquet", DataError)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    names = _hf_class_names(schema.metadata)
    ints = frozenset(f.name for f in schema if pa.types.is_integer(f.type) and f.name not in names)

    def read(fields: Sequence[str]) -> Records:
        try:
            table = pf.read(columns=list(fields))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet data ({str(e).splitlines()[0]})") from None
        yield from _columns(table.to_pydict(), table.num_rows)

    return Table(str(path), "row", read, list(schema.names), names, ints)


def _dataset_table(ds, name: str) -> Table:
    """A ``datasets.Dataset`` as a table (ClassLabel names and integer fields from its features)."""
    import datasets

    names, ints = {}, set()
    for key, feat in ds.features.items():
        if isinstance(feat, datasets.ClassLabel):
            names[key] = list(feat.names)
        elif isinstance(feat, datasets.Value) and feat.dtype.startswith(("int", "uint")):
            ints.add(key)

    def read(fields: Sequence[str]) -> Records:
        sub = ds.select_columns(list(fields))
        yield from _columns(sub.to_dict(), len(sub))

    return Table(name, "row", read, list(ds.column_names), names, frozenset(ints))


def _pick_split(splits: dict, name: str, split: str | None, default_split: str | None) -> tuple:
    """(split name, dataset) of a DatasetDict: the one named, else the only one, else ``default_split``."""
    if split is None:
        if len(splits) == 1:
            split = next(iter(splits))
        elif default_split in splits:
            split = default_split
        else:
            raise DataError(f"{name} has splits {', '.join(splits)}; name one: {name}:{next(iter(splits))}")
    if split not in splits:
        raise DataError(f"{name}: no split {split!r} (splits: {', '.join(splits)})")
    return split, splits[split]


def _saved(folder: Path, split: str | None, default_split: str | None) -> Table:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    is_dict = (folder / "dataset_dict.json").is_file()
    if not is_dict and not (folder / "state.json").is_file():
        raise DataError(f"{folder}: a folder, but not one saved by datasets' save_to_disk "
                        "(no dataset_dict.json or state.json)")
    if split is not None and not is_dict:
        raise DataError(f"{folder}: a single saved dataset has no splits; drop ':{split}'")
    require("datasets", f"{folder}: reading a saved dataset", DataError)
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{folder}: unreadable saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        split, ds = _pick_split(dict(ds), str(folder), split, default_split)
        return _dataset_table(ds, f"{folder}:{split}")
    return _dataset_table(ds, str(folder))


# ----------------------------------------------------------------------------- the Hugging Face hub


@dataclass(frozen=True)
class HubRef:
    """``hf:NAME[/CONFIG][:SPLIT]`` parsed: the candidate (dataset, config) pairs in the order tried."""

    text: str
    candidates: tuple[tuple[str, str | None], ...]
    split: str | None


def parse_hub_ref(ref: str) -> HubRef:
    """Parse ``hf:NAME[/CONFIG][:SPLIT]`` (pure). NAME is ``name`` or ``owner/name``.

    ``hf:a`` -> ``a``; ``hf:a/b/c`` -> ``a/b`` config ``c``; ``hf:a/b`` -> ``a/b``, else ``a`` config ``b``.
    """
    body = ref[len(HUB_PREFIX):] if ref.startswith(HUB_PREFIX) else ref
    path, sep, split = body.partition(":")
    parts = path.split("/")
    if not path or any(not p.strip() for p in parts) or len(parts) > 3 or (sep and not split.strip()) \
            or ":" in split:
        raise DataError(f"{ref}: expected hf:NAME[/CONFIG][:SPLIT], e.g. hf:ag_news or hf:glue/sst2:validation")
    if len(parts) == 1:
        cands = ((parts[0], None),)
    elif len(parts) == 3:
        cands = (("/".join(parts[:2]), parts[2]),)
    else:
        cands = (("/".join(parts), None), (parts[0], parts[1]))
    return HubRef(ref, cands, split or None)


def _load_hub(dataset: str, config: str | None):
    import datasets

    return datasets.load_dataset(dataset, config)


def _hub(ref: str, default_split: str | None) -> Table:
    require("datasets", f"{ref}: loading a Hugging Face dataset", DataError)
    hub = parse_hub_ref(ref)
    errors = []
    for dataset, config in hub.candidates:
        try:
            ds = _load_hub(dataset, config)
            break
        except Exception as e:  # noqa: BLE001 - datasets' and the hub's many ways of saying "not found",
            # "not cached (offline)", "unknown config", "gated", "has a dataset script": the user's reference
            msg = " ".join(str(e).split())
            errors.append(f"{dataset}{f' config {config}' if config else ''}: {msg[:300]}")
    else:
        raise DataError(f"{ref}: cannot load the dataset ({'; '.join(errors)})")
    label = HUB_PREFIX + dataset + (f"/{config}" if config else "")
    if hasattr(ds, "keys"):  # a DatasetDict
        split, ds = _pick_split(dict(ds), label, hub.split, default_split)
    else:
        split = hub.split
    return _dataset_table(ds, f"{label}:{split}" if split else label)


# ----------------------------------------------------------------------------- the registry


FILE_FORMATS: dict[str, Callable[[Path], Table]] = {
    ".jsonl": _jsonl, ".json": _jsonl, ".ndjson": _jsonl,
    ".csv": _delimited(","), ".tsv": _delimited("\t"),
    ".parquet": _parquet,
}
"""Readers of data files by suffix."""


def open_table(ref: str | Path, default_split: str | None = "train") -> Table:
    """The records a data reference points at.

    Args:
        ref: a file, a saved ``datasets`` folder (``FOLDER[:SPLIT]``) or ``hf:NAME[/CONFIG][:SPLIT]``.
        default_split: the split of a dataset with several when the reference names none
            (None: the reference must name one).
    Raises:
        DataError: no such file, unknown file type, a missing split or package, a dataset that
            cannot be loaded.
    """
    text = str(ref)
    if is_hub_ref(text):
        return _hub(text, default_split)
    path = Path(text)
    if path.is_dir():
        return _saved(path, None, default_split)
    if path.is_file():
        reader = FILE_FORMATS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unknown file type {path.suffix.lower()!r}; use .jsonl, .csv, .tsv, .parquet, "
                            "a folder saved by datasets, or hf:NAME")
        return reader(path)
    folder, sep, split = text.rpartition(":")
    if sep and folder and split and Path(folder).is_dir():
        return _saved(Path(folder), split, default_split)
    raise DataError(f"{path}: no such data file")
