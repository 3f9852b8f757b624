from __future__ import annotations

import re

import pytest

from softprompt.cli import main
from softprompt.commands.demo import DemoConfig
from softprompt.errors import ConfigError

TINY = ["--steps", "2", "--batch-size", "2", "--max-length", "32", "--dev-size", "5", "--test-size", "10",
        "--shots", "2", "--threads", "1"]


def _check_outputs(out: str, folder) -> None:
    for method in ("soft prompt", "bare model", "instruction", "instruction, chat", "few-shot", "TF-IDF + LR"):
        assert re.search(rf"^{re.escape(method)}\s+\d\.\d{{3}}\s+\d\.\d{{3}}", out, re.M), method
    assert "10 examples" in out and "virtual tokens x" in out and "bytes" in out
    assert re.search(r"^method\s+accuracy\s+macro-F1", out, re.M)  # macro-F1 next to accuracy (#14)
    assert re.search(r"^soft prompt: accuracy \d\.\d{3}, macro-F1 \d\.\d{3}; best baseline by macro-F1: .+ "
                     r"\d\.\d{3} \(accuracy \d\.\d{3}\)$", out, re.M)
    assert (folder / "topic.safetensors").is_file() and (folder / "topic.run" / "metrics.jsonl").is_file()
    page = (folder / "report.html").read_text()
    assert "Training curves from" in page  # the run's log was found
    for png in ("report-comparison.png", "report-confusion.png", "report-curves.png"):
        assert (folder / png).stat().st_size > 1000
    for split in ("train", "dev", "test"):
        assert (folder / "data" / f"{split}.jsonl").is_file()


def test_demo_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--model", str(tiny_dir), *TINY]) == 0
    _check_outputs(capsys.readouterr().out, tmp_path)


@pytest.mark.real_model
def test_demo_on_the_default_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), *TINY]) == 0
    _check_outputs(capsys.readouterr().out, tmp_path)


def test_demo_flags_are_checked():
    with pytest.raises(ConfigError, match="--steps"):
        DemoConfig(steps=0)
    with pytest.raises(ConfigError, match="--test-size"):
        DemoConfig(test_size=1)
