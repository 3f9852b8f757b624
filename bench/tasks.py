"""The benchmark tasks: the examples of ``softprompt example-data`` (same loaders, same seeded
train/dev/test split), the template each side trains with, and seeded subsamples."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.data import Example, TaskSpec
from softprompt.examples import DATASETS, split, subsample

TASKS = ("bbc-news", "tweet-sentiment", "headlines")
DATASET_OF = {"bbc-news": "bbc-news", "tweet-sentiment": "tweet-sentiment", "headlines": "bbc-headlines"}
TEMPLATES = {
    "bbc-news": "Text: {text}\nTopic:",
    "tweet-sentiment": "Tweet: {text}\nSentiment:",
    "headlines": "Article: {input}\nHeadline:",
}
NAMES = {"bbc-news": "topic", "tweet-sentiment": "sentiment", "headlines": "headline"}
"""The task's name as a prompt file records it (used by the instruction baseline)."""


@dataclass
class TaskData:
    """One task: its spec (template, labels) and train/dev/test examples."""

    name: str
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]


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
    return TaskData(name, spec, parts["train"], parts["dev"], parts["test"])


def sample(data: TaskData, which: str, n: int | None, seed: int = 0) -> list[Example]:
    """A seeded (stratified for classification) sample of at most ``n`` examples of a split."""
    items = getattr(data, which)
    return list(items) if n is None or n >= len(items) else subsample(items, n, data.spec.kind, seed)
