from __future__ import annotations

import pytest

from softprompt.data import (
    DataError, TaskSpec, check_classification, load_examples, parse_verbalizer, split_examples, Example,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_jsonl_and_csv_load(tmp_path):
    j = write(tmp_path, "a.jsonl", '{"text": "hi", "label": "pos"}\n\n{"text": "bye", "label": 1}\n')
    ex = load_examples(j, "classify")
    assert [(e.source, e.target, e.line) for e in ex] == [("hi", "pos", 1), ("bye", "1", 3)]
    c = write(tmp_path, "a.csv", 'body,cat\n"x, y",b\nz,a\n')
    ex = load_examples(c, "classify", "body", "cat")
    assert [(e.source, e.target, e.line) for e in ex] == [("x, y", "b", 2), ("z", "a", 3)]
    g = write(tmp_path, "g.jsonl", '{"input": "article", "output": "headline"}\n')
    assert load_examples(g, "generate")[0].target == "headline"


@pytest.mark.parametrize(
    "name,text,msg",
    [
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n', r"bad.jsonl:2: malformed JSON"),
        ("miss.jsonl", '{"text": "a"}\n', r"miss.jsonl:1: missing field 'label'"),
        ("empty.jsonl", '{"text": "  ", "label": "x"}\n', r"empty.jsonl:1: field 'text' is empty"),
        ("none.jsonl", "\n\n", r"none.jsonl: no examples"),
        ("arr.jsonl", "[1, 2]\n", r"arr.jsonl:1: expected a JSON object"),
        ("extra.csv", "text,label\na,b,c\n", r"extra.csv:2: more fields"),
        ("x.txt", "hello", r"unknown file type"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, msg):
    with pytest.raises(DataError, match=msg):
        load_examples(write(tmp_path, name, text), "classify")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl", "classify")


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(kind="classify", template="no placeholder", labels=["a", "b"]), r"must contain \{text\}"),
        (dict(kind="generate", template="Text: {text}"), r"must contain \{input\}"),
        (dict(kind="classify", labels=["a"]), "at least 2 labels"),
        (dict(kind="classify", labels=["a", "b"], verbalizer={"a": "same", "b": "same"}), "same words"),
        (dict(kind="classify", labels=["a", "b"], verbalizer={"c": "x"}), "unknown label"),
        (dict(kind="summarize"), "unknown task"),
    ],
)
def test_bad_task_specs(kw, msg):
    with pytest.raises(DataError, match=msg):
        TaskSpec(**kw)


def test_single_class_and_unseen_eval_label():
    train = [Example("a", "x", 1), Example("b", "x", 2)]
    with pytest.raises(DataError, match="single class"):
        check_classification(train, None, ["x", "y"])
    train.append(Example("c", "y", 3))
    with pytest.raises(DataError, match=r"dev.jsonl:4: label 'z' never seen"):
        check_classification(train, [Example("d", "z", 4)], ["x", "y"], "dev.jsonl")


def test_source_is_cut_to_max_length_keeping_the_template_end(tiny):
    spec = TaskSpec("classify", template="Text: {text}\nTopic:", labels=["a", "b"], max_length=20)
    ids = spec.source_ids(tiny.tokenizer, "the quick brown fox " * 50)
    assert len(ids) <= 20
    assert tiny.tokenizer.decode(ids).endswith("\nTopic:")


def test_label_and_target_ids(tiny):
    spec = TaskSpec("classify", labels=["pos", "neg"], verbalizer={"pos": "great"})
    assert spec.words == ["great", "neg"]
    assert tiny.tokenizer.decode(spec.label_ids(tiny.tokenizer)[0]) == " great"
    gen = TaskSpec("generate", max_target_length=4)
    t = gen.target_ids(tiny.tokenizer, "the quick brown fox jumps")
    assert len(t) == 4 and t[-1] == tiny.tokenizer.eos_token_id


def test_split_is_seeded_and_disjoint():
    ex = [Example(str(i), "x", i) for i in range(20)]
    a1, b1 = split_examples(ex, 0.25, seed=1)
    a2, b2 = split_examples(ex, 0.25, seed=1)
    assert [e.line for e in b1] == [e.line for e in b2] and len(b1) == 5 and len(a1) == 15
    with pytest.raises(DataError, match="between 0 and 1"):
        split_examples(ex, 1.5)


def test_parse_verbalizer(tmp_path):
    assert parse_verbalizer("pos=great, neg=awful") == {"pos": "great", "neg": "awful"}
    assert parse_verbalizer('{"a": "x"}') == {"a": "x"}
    f = write(tmp_path, "v.json", '{"a": "y"}')
    assert parse_verbalizer(str(f)) == {"a": "y"}
    with pytest.raises(DataError, match="expected label=words"):
        parse_verbalizer("pos")
