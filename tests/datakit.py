"""Shared helpers of the data-source tests: one small labelled set written as JSONL, Parquet, a
folder saved by ``datasets`` and a Hugging Face dataset cache, all built offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NAMES = ["negative", "positive"]
TEXTS = ["a fine film", "dull and long", "loved every minute", "I want my money back", "great cast",
         "the plot made no sense", "a joy to watch", "never again"]


def rows(split: str = "train") -> list[dict]:
    """``{"sentence": str, "label": int}`` rows (class ids of :data:`NAMES`); dev rows differ."""
    texts = TEXTS if split == "train" else [t.upper() for t in TEXTS[:4]]
    return [{"sentence": t, "label": (i + 1) % 2} for i, t in enumerate(texts)]


def jsonl(path: Path, split: str = "train") -> Path:
    """The same rows as JSONL with label names: what every other form must read as."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"sentence": r["sentence"], "label": NAMES[r["label"]]}) + "\n"
                            for r in rows(split)), encoding="utf-8")
    return path


def features():
    from datasets import ClassLabel, Features, Value

    return Features({"sentence": Value("string"), "label": ClassLabel(names=NAMES)})


def dataset(split: str = "train"):
    """A ``datasets.Dataset`` with a ClassLabel ``label``."""
    import datasets

    r = rows(split)
    return datasets.Dataset.from_dict({k: [x[k] for x in r] for k in ("sentence", "label")}, features=features())


def hub_cache(cache: Path, name: str, config: str, src: Path) -> Path:
    """A ``datasets`` cache holding dataset ``name`` (config ``config``; splits train and validation)
    as ``load_dataset`` leaves it after a download, built by datasets' own JSON builder from local
    files (no hub here). Load it with ``HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE=cache``."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json, JsonConfig

    files = {}
    for split in ("train", "validation"):
        p = src / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows(split)), encoding="utf-8")
        files[split] = [str(p)]

    class Builder(Json):  # a named config, as a hub dataset's README declares it
        BUILDER_CONFIGS = [JsonConfig(name=config, features=features(), data_files=DataFilesDict.from_patterns(files))]

    short = name.split("/")[-1]
    Builder(cache_dir=str(cache / "_build"), dataset_name=short, config_name=config, hash="0" * 16).download_and_prepare()
    target = cache / name.replace("/", "___")  # where datasets keeps owner/name
    target.parent.mkdir(parents=True, exist_ok=True)
    (cache / "_build" / short).rename(target) if not target.exists() else None
    shutil.rmtree(cache / "_build")
    return cache
