from __future__ import annotations

import json

import pytest

from softprompt import PromptedModel, PromptMeta, SoftPrompt, save_prompt
from softprompt.cli import main
from softprompt.evaluate.compare import EvalConfig, evaluate_file, training_file
from softprompt.data import TaskSpec, load_examples
from softprompt.errors import ConfigError
from softprompt.evaluate import evaluate_prompt

LABELS = ["business", "film", "sport"]
ROWS = [("the match was won by the home team", "sport"), ("shares fell as the market reacted", "business"),
        ("the film won three awards", "film"), ("the team won in extra time", "sport"),
        ("the central bank cut the interest rate", "business"), ("the singer released a new album", "film")]


def _jsonl(path, rows, keys=("text", "label")):
    path.write_text("".join(json.dumps(dict(zip(keys, r))) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tiny, tmp_path):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "labels", labels=LABELS)
    train = _jsonl(tmp_path / "train.jsonl", ROWS * 2)
    meta = PromptMeta.for_base(tiny, 4, task="classify", name="topic", template="Text: {text}\nTopic:", labels=LABELS,
                               training={"train_file": str(train), "max_length": 64})
    prompt = save_prompt(tmp_path / "topic.safetensors", p.weight, meta)
    return prompt, _jsonl(tmp_path / "test.jsonl", ROWS), train


def test_json_has_every_method_and_matches_the_scoring_path(files, tiny, tiny_dir, capsys):
    prompt, test, _ = files
    assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir), "--baselines", "--json",
                 "--shots", "3", "--precision", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["results"]) == ["prompt", "bare", "instruction", "instruction-chat", "few-shot", "tfidf-lr"]
    assert out["skipped"] == {}
    assert out["n"] == 6 and out["max_length"] == 64 and out["train"].endswith("train.jsonl")  # from the summary
    r = out["results"]["prompt"]
    assert set(r["per_class"]) == set(LABELS) and len(r["confusion"]["matrix"]) == 3 and "predictions" not in r
    # the command scores the prompt exactly as evaluate_prompt does
    from softprompt.artifact import load_prompt

    spec = TaskSpec("classify", template="Text: {text}\nTopic:", labels=LABELS, max_length=64)
    ref = evaluate_prompt(PromptedModel(tiny), load_prompt(prompt).tensor, spec, load_examples(test, "classify"))
    assert r["accuracy"] == ref["accuracy"] and r["log_loss"] == pytest.approx(ref["log_loss"], abs=1e-5)
    assert out["precision"] == "fp32"
    # bf16 autocast: the same path, close scores
    assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir), "--json", "--precision", "bf16"]) == 0
    bf = json.loads(capsys.readouterr().out)
    assert bf["precision"] == "bfloat16" and bf["results"]["prompt"]["log_loss"] == pytest.approx(ref["log_loss"], rel=0.02)


def test_human_table_and_report(files, tiny_dir, tmp_path, capsys):
    prompt, test, train = files
    report = tmp_path / "rep" / "report.html"
    assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir), "--baselines",
                 "--train", str(train), "--report", str(report), "--instruction", "Name the topic."]) == 0
    out = capsys.readouterr().out
    for word in ("soft prompt", "bare model", "instruction", "instruction, chat", "few-shot", "TF-IDF + LR",
                 "confusion", "precision"):
        assert word in out
    assert report.is_file() and (tmp_path / "rep" / "report-confusion.png").is_file()
    assert "Name the topic." in report.read_text()


def test_generation_eval(tiny, tiny_dir, tmp_path, capsys):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 3, "vocab")
    prompt = save_prompt(tmp_path / "g.safetensors", p.weight, PromptMeta.for_base(tiny, 3, task="generate"))
    data = _jsonl(tmp_path / "g.jsonl", [("shares fell", "market"), ("the team won", "sport")], ("input", "output"))
    assert main(["eval", str(prompt), "--data", str(data), "--model", str(tiny_dir), "--baselines", "--train",
                 str(data), "--max-new-tokens", "3", "--json", "--stop", "."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["results"]) == ["prompt", "bare", "instruction", "instruction-chat", "few-shot"]
    assert all(0 <= r["rouge_l"] <= 1 for r in out["results"].values())


def test_limit_is_stratified_and_few_shot_skipped_without_train(files, tiny):
    prompt, test, _ = files
    import softprompt.artifact as art

    meta = art.load_prompt(prompt).meta
    meta.training = {}
    bare_prompt = art.save_prompt(prompt.with_name("nosummary.safetensors"), art.load_prompt(prompt).tensor, meta)
    res = evaluate_file(EvalConfig(str(bare_prompt), str(test), baselines=True, limit=3), base=tiny)
    assert res.n == 3 and sorted(res.gold) == sorted(LABELS)
    assert set(res.skipped) == {"few-shot", "tfidf-lr"} and "pass --train" in res.skipped["tfidf-lr"]


def test_training_file_lookup(files, tmp_path):
    prompt, _, train = files
    from softprompt.artifact import load_prompt

    meta = load_prompt(prompt).meta
    assert training_file(meta, prompt) == train
    meta.training = {"train_file": "train.jsonl"}  # relative to the prompt file's folder
    assert training_file(meta, prompt) == tmp_path / "train.jsonl"
    meta.training = {"train_file": "gone.jsonl"}
    assert training_file(meta, prompt) is None


@pytest.mark.parametrize("rows,match", [
    ([("a text", "sport"), ("another", "weather")], r"test.jsonl:2: label 'weather' is not one of the prompt's labels"),
    ([("a text", "sport"), ("no label",)], r"test.jsonl:2: missing field 'label'"),
])
def test_data_errors_are_one_line(files, tiny_dir, capsys, rows, match):
    prompt, test, _ = files
    test.write_text("".join(json.dumps(dict(zip(("text", "label"), r))) + "\n" for r in rows))
    assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re

    assert re.search(match, err)


def test_bad_train_labels_and_flags(files, tiny_dir, tmp_path, capsys):
    prompt, test, _ = files
    bad_train = _jsonl(tmp_path / "bad_train.jsonl", [("x", "sport"), ("y", "cooking")])
    assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir), "--baselines",
                 "--train", str(bad_train)]) == 2
    assert "bad_train.jsonl:2: label 'cooking'" in capsys.readouterr().err
    for flags, msg in [(["--shots", "0"], "--shots"), (["--batch-size", "0"], "--batch-size"),
                       (["--report", "r.pdf"], "--report"), (["--limit", "0"], "--limit")]:
        assert main(["eval", str(prompt), "--data", str(test), "--model", str(tiny_dir), *flags]) == 2
        assert msg in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none.safetensors"), "--data", str(test)]) == 2
    assert "no such prompt file" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        EvalConfig("p", "d", max_length=4)


def _readme_commands(section: str) -> list[str]:
    import re
    from pathlib import Path

    from docs_examples import page

    blocks = re.findall(r"```bash\n(.*?)```", page(section), re.S)
    return [l.split("  #")[0].strip() for b in blocks for l in b.splitlines() if "softprompt " in l]


def test_readme_commands_run(files, tiny_dir, tmp_path, monkeypatch, capsys):
    """The commands of the README's Evaluation, Prediction and Example data sections, on the tiny
    model (``--model`` added) in a folder holding the files they name."""
    import io
    import shlex

    prompt, test, _ = files
    assert prompt == tmp_path / "topic.safetensors" and test == tmp_path / "test.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "the match was won", "id": 1}) + "\n")
    cmds = [c for s in ("Evaluation", "Prediction", "Example data") for c in _readme_commands(s)]
    assert len(cmds) >= 6
    for cmd in cmds:
        stdin = None
        if cmd.startswith("cat "):
            src, cmd = cmd[4:].split("|", 1)
            stdin = io.StringIO((tmp_path / src.strip()).read_text())
        cmd = cmd.split(" > ")[0]
        argv = shlex.split(cmd)[1:]
        if argv[0] != "example-data":
            argv += ["--model", str(tiny_dir)]
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", stdin)
        assert main(argv) == 0, cmd
        capsys.readouterr()
    assert (tmp_path / "report.html").is_file() and (tmp_path / "data" / "bbc" / "test.jsonl").is_file()


def test_trained_spec_reads_lengths_from_the_training_summary():
    from softprompt.evaluate.compare import trained_spec

    meta = PromptMeta("m", "f", 2, 8, task="generate", training={"config": {"max_length": 100, "max_target_length": 20}})
    spec = trained_spec(meta)
    assert (spec.max_length, spec.max_target_length) == (100, 20)
    assert trained_spec(meta, 50).max_length == 50
    meta.training = {}
    assert (trained_spec(meta).max_length, trained_spec(meta).max_target_length) == (256, 64)
