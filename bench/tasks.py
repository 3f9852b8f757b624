"""The benchmark tasks: the examples of ``softprompt example-data`` (same loaders, same seeded
train/dev/test split), the template each side trains with, and seeded subsamples.

``tweet-imbalanced`` is tweet-sentiment with every split cut to fixed, skewed class shares
(:data:`IMBALANCED`: 65% positive, 25% neutral, 10% negative), as real tickets and reviews are."""

from __future__ import annotations

import random
from dataclasses import dataclass

from softprompt.data import Example, TaskSpec
from softprompt.examples import DATASETS, split, subsample

TASKS = ("bbc-news", "tweet-sentiment", "tweet-imbalanced", "headlines")
DATASET_OF = {"bbc-news": "bbc-news", "tweet-sentiment": "tweet-sentiment", "tweet-imbalanced": "tweet-sentiment",
              "headlines": "bbc-headlines"}
TEMPLATES = {
    "bbc-news": "Text: {text}\nTopic:",
    "tweet-sentiment": "Tweet: {text}\nSentiment:",
    "tweet-imbalanced": "Tweet: {text}\nSentiment:",
    "headlines": "Article: {input}\nHeadline:",
}
NAMES = {"bbc-news": "topic", "tweet-sentiment": "sentiment", "tweet-imbalanced": "sentiment",
         "headlines": "headline"}
IMBALANCED = {"tweet-imbalanced": ({"positive": 0.65, "neutral": 0.25, "negative": 0.10},
                                   {"train": 1000, "dev": 200, "test": 400})}
"""Task -> (class shares, examples per split): each split is a seeded draw with exactly these shares."""
"""The task's name as a prompt file records it (used by the instruction baseline)."""


@dataclass
class TaskData:
    """One task: its spec (template, labels) and train/dev/test examples."""

    name: str
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def train_fields(spec: TaskSpec) -> dict:
    """The task's ``TrainConfig`` fields (kind, template, labels, target length), for either kind (pure)."""
    return {"task": spec.kind, "template": spec.template, "labels": spec.labels,
            "max_target_length": spec.max_target_length}


def load_task(name: str, max_length: int = 160, max_target_length: int = 32) -> TaskData:
    """Examples and spec of benchmark task ``name`` (one of :data:`TASKS`); texts are cut so the
    rendered source fits ``max_length`` tokens."""
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    ds = DATASETS[DATASET_OF[name]]
    parts = split(ds.load(), ds.kind, seed=0)
    if ds.kind == "generate":
        spec = TaskSpec("generate", TEMPLATES[name], max_length=max_length, max_target_length=max_target_length)
    else:
        labels = sorted({e.target for e in parts["train"]})
        spec = TaskSpec("classify", TEMPLATES[name], labels=labels, max_length=max_length)
    if name in IMBALANCED:
        shares, sizes = IMBALANCED[name]
        parts = {s: skewed(parts[s], shares, sizes[s], seed=0) for s in parts}
    return TaskData(name, spec, parts["train"], parts["dev"], parts["test"])


def skewed(examples: list[Example], shares: dict[str, float], n: int, seed: int = 0) -> list[Example]:
    """A seeded draw of ``n`` examples with class ``c`` making ``round(shares[c] * n)`` of them (shuffled)."""
    rng = random.Random(seed)
    out: list[Example] = []
    for label, share in sorted(shares.items()):
        pool = [e for e in examples if e.target == label]
        out += rng.sample(pool, round(share * n))
    rng.shuffle(out)
    return out


def sample(data: TaskData, which: str, n: int | None, seed: int = 0) -> list[Example]:
    """A seeded (stratified for classification) sample of at most ``n`` examples of a split."""
    items = getattr(data, which)
    return list(items) if n is None or n >= len(items) else subsample(items, n, data.spec.kind, seed)
