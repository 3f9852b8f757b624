from __future__ import annotations

import base64
import json
import re

import pytest

from softprompt.artifact import PromptMeta
from softprompt.evaluate.baselines import Comparison
from softprompt.data import TaskSpec
from softprompt.errors import DataError
from softprompt.evaluate import classification_metrics, generation_metrics
from softprompt.evaluate.report import curve_series, find_log, plot_confusion, plot_curves, read_log, write_report

PNG = b"\x89PNG\r\n\x1a\n"
LABELS = ["business", "sport", "tech"]


def _comparison(kind="classify", training=None, prompt_path="p.safetensors") -> Comparison:
    meta = PromptMeta("tiny", "f" * 32, 4, 64, task=kind, name="topic", training=training or {},
                      labels=LABELS if kind == "classify" else None)
    if kind == "classify":
        spec = TaskSpec("classify", labels=LABELS)
        gold = ["business", "sport", "tech", "sport"]
        res = {"prompt": classification_metrics(gold, ["business", "sport", "tech", "tech"], LABELS),
               "bare": classification_metrics(gold, ["sport"] * 4, LABELS),
               "tfidf-lr": classification_metrics(gold, gold, LABELS)}
    else:
        spec, gold = TaskSpec("generate"), ["a b", "c d"]
        res = {"prompt": generation_metrics(gold, ["a b", "c"]), "bare": generation_metrics(gold, ["x", "y"])}
    for r in res.values():
        r["seconds"], r["setup"] = 1.0, "<setup & co>"
    return Comparison(prompt_path, "test.jsonl", meta, spec, len(gold), res, {"few-shot": "no training data"},
                      None, gold)


def test_curve_series_groups_losses_and_metrics():
    recs = [{"step": 1, "loss": 2.0, "lr": 0.3}, {"step": 2, "loss": 1.5, "seconds": 3},
            {"step": 2, "split": "dev", "loss": 1.7, "accuracy": 0.6}, {"note": "no step"}, {"step": 3, "loss": float("nan")}]
    s = curve_series(recs)
    assert s["loss"] == {"loss": ([1.0, 2.0], [2.0, 1.5]), "dev/loss": ([2.0], [1.7])}
    assert s["metric"] == {"dev/accuracy": ([2.0], [0.6])}
    assert plot_curves([{"step": 1, "lr": 0.1}]) is None
    assert plot_curves(recs).startswith(PNG)


def test_read_log_errors_name_the_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match="metrics.jsonl:3"):
        read_log(p)
    with pytest.raises(DataError, match="no such training log"):
        read_log(tmp_path / "none.jsonl")


def test_find_log(tmp_path):
    prompt = tmp_path / "topic.safetensors"
    assert find_log(prompt) is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text("")
    assert find_log(prompt, {"log": "logs/metrics.jsonl"}) == tmp_path / "logs" / "metrics.jsonl"
    (tmp_path / "metrics.jsonl").write_text("")
    assert find_log(prompt) == tmp_path / "metrics.jsonl"


def test_confusion_plot():
    m = classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    assert plot_confusion(m).startswith(PNG)


def test_report_without_log_is_self_contained(tmp_path):
    paths = write_report(tmp_path / "out" / "report.html", _comparison(prompt_path=str(tmp_path / "p.safetensors")))
    assert [p.name for p in paths] == ["report.html", "report-comparison.png", "report-confusion.png"]
    page = paths[0].read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 2 and all(base64.b64decode(i).startswith(PNG) for i in imgs)
    assert base64.b64decode(imgs[0]) == paths[1].read_bytes()
    assert "No training log" in page and "&lt;setup &amp; co&gt;" in page  # escaped
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing external
    assert "TF-IDF + LR" in page and "few-shot skipped" in page


def test_report_with_log_and_generation(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 3 / s, "dev_rouge_l": s / 10}) for s in range(1, 6)))
    paths = write_report(tmp_path / "r.html", _comparison("generate", prompt_path=str(tmp_path / "p.safetensors")))
    assert [p.name for p in paths] == ["r.html", "r-comparison.png", "r-curves.png"]
    assert "Training curves from" in paths[0].read_text()
    paths = write_report(tmp_path / "r2.html", _comparison(), log=log)
    assert "r2-curves.png" in [p.name for p in paths]


def test_curve_series_reads_the_training_log_format():
    """train.py's metrics.jsonl: step records and evaluation records nesting metrics per task."""
    recs = [{"step": 1, "loss": 1.2, "lr": 0.01, "examples": 8, "examples_per_s": 3.0, "elapsed": 2.0},
            {"step": 2, "loss": 0.9, "lr": 0.02, "examples": 16, "examples_per_s": 3.1, "elapsed": 4.0},
            {"step": 2, "eval": {"topic": {"accuracy": 0.5, "macro_f1": 0.4, "log_loss": 1.1, "n": 10}}, "improved": True},
            {"step": 2, "eval": {"topic": {"accuracy": 0.5}, "other": {"rouge_l": 0.2}}, "improved": False}]
    s = curve_series(recs[:3])
    assert s["loss"] == {"loss": ([1.0, 2.0], [1.2, 0.9]), "dev/log_loss": ([2.0], [1.1])}
    assert s["metric"] == {"dev/accuracy": ([2.0], [0.5]), "dev/macro_f1": ([2.0], [0.4])}
    multi = curve_series(recs[3:])["metric"]
    assert set(multi) == {"dev/topic/accuracy", "dev/other/rouge_l"}
    assert set(curve_series(recs[3:], task="topic")["metric"]) == {"dev/accuracy"}
    long = [{"step": i, "loss": 1 / i} for i in range(1, 60)]
    assert plot_curves(long).startswith(PNG)  # with the running mean


def test_find_log_in_the_training_run_folder(tmp_path):
    (tmp_path / "topic.run").mkdir()
    (tmp_path / "topic.run" / "metrics.jsonl").write_text("")
    assert find_log(tmp_path / "topic.safetensors") == tmp_path / "topic.run" / "metrics.jsonl"
