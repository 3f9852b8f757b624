"""Data sources beyond JSONL/CSV: Parquet, folders saved by ``datasets``, Hugging Face dataset ids
(from a cache built here, in datasets' offline mode). Each must give the examples the equivalent
JSONL gives; bad input fails in one line naming the source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.data import load_examples
from softprompt.errors import DataError
from softprompt.sources import parse_hub_ref
from datakit import NAMES, dataset, hub_cache, jsonl, rows

pytest.importorskip("datasets")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def pairs(examples):
    return [(e.source, e.target) for e in examples]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The same train and dev rows in every form: reference -> (split it holds)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("forms")
    train, dev = dataset("train"), dataset("validation")
    train.to_parquet(str(d / "classlabel.parquet"))  # datasets' own writer: ClassLabel names in the metadata
    pq.write_table(pa.table({"sentence": [r["sentence"] for r in rows()],  # plain pyarrow, string labels
                             "label": [NAMES[r["label"]] for r in rows()], "extra": list(range(len(rows())))}),
                   d / "plain.parquet")
    train.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(d / "dict"))
    return {"dir": d, "train": jsonl(d / "train.jsonl"), "dev": jsonl(d / "dev.jsonl", "validation"),
            "train_refs": [d / "classlabel.parquet", d / "plain.parquet", d / "saved", d / "dict", f"{d / 'dict'}:train",
                           d / "dict" / "train"],
            "dev_refs": [f"{d / 'dict'}:validation", d / "dict" / "validation"]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A datasets cache holding ``glue`` (config ``sst2``) and ``stanfordnlp/imdb`` (``plain_text``)."""
    d = tmp_path_factory.mktemp("hub")
    hub_cache(d / "cache", "glue", "sst2", d / "src1")
    hub_cache(d / "cache", "stanfordnlp/imdb", "plain_text", d / "src2")
    return d / "cache"


@pytest.fixture
def offline(hub, monkeypatch):
    """datasets' offline mode against the cache (as HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE=... do at import)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub)
    return hub


def test_every_local_form_reads_as_the_jsonl(forms):
    want = pairs(load_examples(forms["train"], "classify", "sentence"))
    assert [t for _, t in want] == [NAMES[r["label"]] for r in rows()]  # names, not class ids
    for ref in forms["train_refs"]:
        ex = load_examples(ref, "classify", "sentence")
        assert pairs(ex) == want, ref
        assert [e.line for e in ex] == list(range(1, len(want) + 1))  # rows numbered from 1
    dev = pairs(load_examples(forms["dev"], "classify", "sentence"))
    for ref in forms["dev_refs"]:
        assert pairs(load_examples(ref, "classify", "sentence", default_split=None)) == dev, ref


def test_generate_fields_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"article": ["one two three", "four five"], "title": ["one", "four"], "n": [3, 2]}),
                   tmp_path / "g.parquet")
    ex = load_examples(tmp_path / "g.parquet", "generate", "article", "title")
    assert pairs(ex) == [("one two three", "one"), ("four five", "four")]
    ex = load_examples(tmp_path / "g.parquet", "generate", "article", "n")  # integers are fine as outputs
    assert [e.target for e in ex] == ["3", "2"]


def test_hub_ids_read_as_the_jsonl_offline(forms, offline):
    train = pairs(load_examples(forms["train"], "classify", "sentence"))
    dev = pairs(load_examples(forms["dev"], "classify", "sentence"))
    assert pairs(load_examples("hf:glue/sst2", "classify", "sentence")) == train  # dataset glue, config sst2
    assert pairs(load_examples("hf:glue/sst2:validation", "classify", "sentence")) == dev
    assert pairs(load_examples("hf:stanfordnlp/imdb:validation", "classify", "sentence")) == dev  # owner/name
    assert pairs(load_examples("hf:stanfordnlp/imdb/plain_text:train", "classify", "sentence")) == train


def test_hub_id_in_a_fresh_process_with_offline_env(hub, forms, tmp_path):
    """What a user does after one download: HF_DATASETS_OFFLINE=1, nothing patched."""
    code = ("import json, sys; from softprompt.data import load_examples; "
            "print(json.dumps([[e.source, e.target] for e in load_examples(sys.argv[1], 'classify', 'sentence')]))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(hub), "PYTHONPATH": SRC,
           "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code, "hf:glue/sst2:validation"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = pairs(load_examples(forms["dev"], "classify", "sentence"))
    assert [tuple(p) for p in json.loads(out.stdout.splitlines()[-1])] == want


@pytest.mark.parametrize("ref,msg", [
    ("hf:glue/sst2:test", r"^hf:glue/sst2: no split 'test' \(splits: train, validation\)$"),
    ("hf:glue/qnli", r"^hf:glue/qnli: cannot load the dataset \(.*config 'qnli'"),
    ("hf:nothere", r"^hf:nothere: cannot load the dataset \(nothere: Couldn't reach"),
])
def test_bad_hub_refs(offline, ref, msg):
    with pytest.raises(DataError, match=msg) as e:
        load_examples(ref, "classify", "sentence")
    assert "\n" not in str(e.value)


def test_a_split_must_be_named_where_there_is_no_default(forms, offline):
    with pytest.raises(DataError, match=r"hf:glue/sst2 has splits train, validation; name one: hf:glue/sst2:train"):
        load_examples("hf:glue/sst2", "classify", "sentence", default_split=None)
    with pytest.raises(DataError, match=r"dict has splits train, validation; name one: .*dict:train"):
        load_examples(forms["dir"] / "dict", "classify", "sentence", default_split=None)


def test_bad_typed_sources(forms, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = forms["dir"]
    with pytest.raises(DataError, match=r"plain.parquet: no field 'text' \(fields: sentence, label, extra\); "
                                        r"name the right one with --text-field"):
        load_examples(d / "plain.parquet", "classify")
    with pytest.raises(DataError, match=r"saved: no field 'title' .*--output-field"):
        load_examples(d / "saved", "generate", "sentence", "title")
    with pytest.raises(DataError, match=r"dict: no split 'test' \(splits: train, validation\)"):
        load_examples(f"{d / 'dict'}:test", "classify", "sentence")
    with pytest.raises(DataError, match=r"saved: a single saved dataset has no splits"):
        load_examples(f"{d / 'saved'}:train", "classify", "sentence")
    # integer labels without names: refused (a label "0" would be trained as the word "0")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet: field 'label' holds integer class ids without names"):
        load_examples(tmp_path / "ints.parquet", "classify")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(DataError, match=r"ints: field 'label' holds integer class ids without names"):
        load_examples(tmp_path / "ints", "classify")
    # a ClassLabel of -1 (an unlabelled test split) and empty values name their row
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]}, features=datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})).save_to_disk(str(tmp_path / "unl"))
    with pytest.raises(DataError, match=r"unl, row 2: field 'label' has no label \(class id -1"):
        load_examples(tmp_path / "unl", "classify")
    pq.write_table(pa.table({"text": ["a", None], "label": ["x", "y"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null.parquet, row 2: missing field 'text'"):
        load_examples(tmp_path / "null.parquet", "classify")
    from softprompt.data import check_classification

    pq.write_table(pa.table({"sentence": ["x", "y"], "label": ["positive", "neutral"]}), tmp_path / "dev.parquet")
    train = load_examples(d / "saved", "classify", "sentence")
    with pytest.raises(DataError, match=r"dev.parquet, row 2: label 'neutral' never seen in training"):
        check_classification(train, load_examples(tmp_path / "dev.parquet", "classify", "sentence"), NAMES, "dev")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "junk.parquet", "classify")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a folder, but not one saved by datasets"):
        load_examples(tmp_path / "folder", "classify")
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty.parquet: no examples \(empty data set\)"):
        load_examples(tmp_path / "empty.parquet", "classify")


def test_parse_hub_ref():
    assert parse_hub_ref("hf:ag_news").candidates == (("ag_news", None),)
    h = parse_hub_ref("hf:glue/sst2:validation")
    assert h.candidates == (("glue/sst2", None), ("glue", "sst2")) and h.split == "validation"
    assert parse_hub_ref("hf:nyu-mll/glue/sst2").candidates == (("nyu-mll/glue", "sst2"),)
    for bad in ("hf:", "hf:a//b", "hf:a/b/c/d", "hf:a:", "hf:a:b:c"):
        with pytest.raises(DataError, match="expected hf:NAME"):
            parse_hub_ref(bad)


def test_missing_package_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"x.parquet: reading Parquet needs the 'parquet' extra \(pyarrow not installed\): "
                                        r"pip install 'softprompt\[parquet\]'$"):
        load_examples(tmp_path / "x.parquet", "classify")


# ----------------------------------------------------------------------------- through the commands


def test_bad_sources_fail_before_the_model_loads_and_write_nothing(forms, tmp_path, tiny, capsys):
    from softprompt import PromptMeta, SoftPrompt, save_prompt

    d = forms["dir"]
    out = tmp_path / "out"
    for data, extra, msg in [
        (d / "plain.parquet", [], "plain.parquet: no field 'text' (fields: sentence, label, extra); "
                                  "name the right one with --text-field"),
        (f"{d / 'dict'}:test", ["--text-field", "sentence"], "dict: no split 'test' (splits: train, validation)"),
        (d / "classlabel.parquet", ["--text-field", "sentence", "--eval", str(d / "dict")],
         "dict has splits train, validation; name one:"),
    ]:
        code = main(["train", "--data", str(data), *extra, "--out", str(out / "p.safetensors"),
                     "--model", "/nonexistent/model", "--report-to", "none"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and msg in err, err
    assert not out.exists()
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 2, "labels", labels=NAMES)
    prompt = save_prompt(tmp_path / "p.safetensors", p.weight, PromptMeta.for_base(tiny, 2, task="classify", labels=NAMES))
    for cmd in (["eval", str(prompt), "--data", f"{d / 'dict'}:test"], ["predict", str(prompt), "--data", str(d / "dict")]):
        assert main([*cmd, "--model", "/nonexistent/model", "--field" if cmd[0] == "predict" else "--source-field",
                     "sentence"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "split" in err and "model" not in err, err


def test_task_file_takes_every_form(forms, tmp_path):
    from softprompt.train.task_config import load_task_file

    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [
        {"name": "a", "data": "local.parquet", "eval": "saved:validation", "source_field": "sentence"},
        {"name": "b", "data": "hf:glue/sst2", "eval": "hf:glue/sst2:validation"}]}))
    a, b = load_task_file(tmp_path / "tasks.json")
    assert a.data == str(tmp_path / "local.parquet") and a.eval == str(tmp_path / "saved:validation")
    assert b.data == "hf:glue/sst2" and b.eval == "hf:glue/sst2:validation"  # ids are not paths


def test_predict_reads_data_and_carries_ids(forms, tmp_path, tiny, tiny_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from softprompt import PromptMeta, SoftPrompt, save_prompt

    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 2, "labels", labels=NAMES)
    prompt = save_prompt(tmp_path / "p.safetensors", p.weight, PromptMeta.for_base(tiny, 2, task="classify", labels=NAMES))
    texts = [r["sentence"] for r in rows()]
    pq.write_table(pa.table({"text": texts, "id": [f"r{i}" for i in range(len(texts))]}), tmp_path / "in.parquet")
    common = ["--model", str(tiny_dir), "--precision", "fp32"]
    assert main(["predict", str(prompt), "--data", str(tmp_path / "in.parquet"), *common]) == 0
    got = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(prompt), *texts, *common]) == 0
    want = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [g.pop("id") for g in got] == [f"r{i}" for i in range(len(texts))]
    assert got == want
