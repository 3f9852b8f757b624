from __future__ import annotations

import io
import json

import pytest

from softprompt import PromptedModel, PromptMeta, SoftPrompt, save_prompt
from softprompt.cli import main
from softprompt.predict import Item, PredictConfig, chunks, parse_line
from softprompt.data import TaskSpec
from softprompt.errors import ConfigError, DataError
from softprompt.evaluate import score_classification

LABELS = ["business", "film", "sport"]
TEXTS = ["the match was won", "shares fell as the market reacted", "the film won three awards", "a new phone",
         "the minister said the election would be held"]


@pytest.fixture
def classify_prompt(tiny, tmp_path):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "labels", labels=LABELS)
    meta = PromptMeta.for_base(tiny, 4, task="classify", template="Text: {text}\nTopic:", labels=LABELS)
    return save_prompt(tmp_path / "c.safetensors", p.weight, meta), p.weight.detach()


@pytest.fixture
def generate_prompt(tiny, tmp_path):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 3, "vocab")
    return save_prompt(tmp_path / "g.safetensors", p.weight, PromptMeta.for_base(tiny, 3, task="generate"))


def _run(monkeypatch, capsys, argv, stdin_text=None):
    if stdin_text is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    code = main(argv)
    cap = capsys.readouterr()
    return code, [json.loads(l) for l in cap.out.splitlines()], cap.err


def test_parse_line():
    assert parse_line("  plain text \n", "text", "stdin:1") == Item("plain text", None, "stdin:1")
    assert parse_line('{"text": "hi", "id": 3}', "text", "w") == Item("hi", 3, "w")
    assert parse_line("   \n", "text", "w") is None
    for line, msg in [('{"text": ', "stdin:4: malformed JSON"), ('{"body": "x"}', "field 'text' is missing"),
                      ('{"text": ["x"]}', "not a string"), ('{"text": " "}', "is empty")]:
        with pytest.raises(DataError, match=msg):
            parse_line(line, "text", "stdin:4")


def test_chunks():
    items = [Item(str(i)) for i in range(5)]
    assert [[it.text for it in c] for c in chunks(iter(items), 2)] == [["0", "1"], ["2", "3"], ["4"]]


def test_classify_matches_scoring_and_batching(classify_prompt, tiny, tiny_dir, monkeypatch, capsys):
    path, weight = classify_prompt
    lines = "\n".join([json.dumps({"text": TEXTS[0], "id": "a"}), TEXTS[1], "", *TEXTS[2:]]) + "\n"
    code, out1, _ = _run(monkeypatch, capsys, ["predict", str(path), "--model", str(tiny_dir), "--batch-size", "2", "--precision", "fp32"], lines)
    assert code == 0 and len(out1) == 5 and out1[0]["id"] == "a" and "id" not in out1[1]
    ref = score_classification(PromptedModel(tiny), weight, TaskSpec("classify", template="Text: {text}\nTopic:",
                                                                      labels=LABELS), TEXTS).exp()
    for row, r in zip(out1, ref):
        assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)
        assert row["label"] == max(row["probs"], key=row["probs"].get) == LABELS[int(r.argmax())]
        assert [row["probs"][l] for l in LABELS] == pytest.approx(r.tolist(), abs=1e-5)
    code, out2, _ = _run(monkeypatch, capsys, ["predict", str(path), *TEXTS, "--model", str(tiny_dir), "--precision", "fp32"])
    assert code == 0 and [r["label"] for r in out2] == [r["label"] for r in out1]
    # options before the texts, texts split around an option: the same inputs
    code, out3, _ = _run(monkeypatch, capsys, ["predict", str(path), "--model", str(tiny_dir), *TEXTS[:2],
                                               "--precision", "fp32", *TEXTS[2:]])
    assert code == 0 and [r["label"] for r in out3] == [r["label"] for r in out1]


def test_generate_greedy_and_seeded_sampling(generate_prompt, tiny_dir, monkeypatch, capsys):
    base = ["predict", str(generate_prompt), "--model", str(tiny_dir), "--max-new-tokens", "4"]
    stdin = "".join(json.dumps({"input": t}) + "\n" for t in TEXTS)
    _, greedy, _ = _run(monkeypatch, capsys, base, stdin)
    assert len(greedy) == 5 and all(r["finish_reason"] in ("eos", "stop", "length") for r in greedy)
    samp = [*base, "--temperature", "20", "--seed", "7"]  # tiny random model: flatten its peaked logits
    _, s1, _ = _run(monkeypatch, capsys, [*samp, "--batch-size", "1"], stdin)
    _, s2, _ = _run(monkeypatch, capsys, [*samp, "--batch-size", "5"], stdin)
    _, s3, _ = _run(monkeypatch, capsys, [*samp[:-1], "8"], stdin)
    assert s1 == s2  # input i is sampled with seed + i whatever the batching
    assert s1 != s3 and s1 != greedy


def test_errors_are_one_line(classify_prompt, tiny_dir, monkeypatch, capsys):
    path, _ = classify_prompt
    code, out, err = _run(monkeypatch, capsys, ["predict", str(path), "--model", str(tiny_dir)], "fine\n{bad json\n")
    assert code == 2 and err.count("\n") == 1 and "stdin:2: malformed JSON" in err
    for flags, msg in [(["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                       (["--batch-size", "0"], "--batch-size")]:
        code, _, err = _run(monkeypatch, capsys, ["predict", str(path), "x", *flags])
        assert code == 2 and msg in err
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        PredictConfig("p", max_new_tokens=0)


def test_no_input_on_a_terminal(classify_prompt, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    path, _ = classify_prompt
    monkeypatch.setattr("sys.stdin", Tty(""))
    assert main(["predict", str(path)]) == 2
    assert "give TEXT arguments or pipe" in capsys.readouterr().err
