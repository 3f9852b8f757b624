"""The README's Training commands and task file run (tiny model, two steps, small stand-in data)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from softprompt import load_prompt
from softprompt.cli import main
from trainkit import easy_classification, easy_generation, learnable_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"
from docs_examples import page  # noqa: E402


def _section(name: str) -> str:
    """A docs page's text; "Training" includes its guides on deep prompts and imbalanced labels."""
    if name == "Training":
        return "\n".join(page(t) for t in ("Training", "Deep prompts and reparameterised prompts", "Imbalanced labels"))
    return page(name)


def test_readme_training_commands_run(tmp_path, model_root, monkeypatch, capsys):
    body = _section("Training")
    cmds = [l.split("  #")[0].strip() for b in re.findall(r"```bash\n(.*?)```", body, re.S)
            for l in b.splitlines() if l.startswith("softprompt ")]
    task_file = json.loads(re.findall(r"```json\n(.*?)```", body, re.S)[0])
    assert len(cmds) >= 4 and any("--task-file" in c for c in cmds) and any("--resume" in c for c in cmds)
    monkeypatch.chdir(tmp_path)
    easy_classification(tmp_path / "bbc")  # stands in for `softprompt example-data bbc-news --out bbc`
    easy_classification(tmp_path / "tweets", labels=("negative", "positive"))
    (tmp_path / "headlines").mkdir()
    easy_generation(tmp_path / "headlines").rename(tmp_path / "headlines" / "train.jsonl")
    (tmp_path / "tasks.json").write_text(json.dumps(task_file))
    model = str(learnable_model_dir(model_root / "learnable"))
    torch.set_num_threads(1)
    capsys.readouterr()
    ran = 0
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        if argv[0] != "train":
            continue
        argv += ["--model", model, "--max-steps", "2", "--prompt-length", "2", "--eval-every", "1", "--quiet",
                 "--checkpoint-every", "1"]
        assert main(argv) == 0, cmd
        ran += 1
    assert ran >= 4
    assert capsys.readouterr().err == ""
    topic = load_prompt(tmp_path / "topic.safetensors")
    assert topic.meta.template == "Text: {text}\nTopic:" and topic.meta.labels == ["business", "sports"]
    names = {p.stem for p in (tmp_path / "prompts").glob("*.safetensors")}
    assert names == {t["name"] for t in task_file["tasks"]}
    assert load_prompt(tmp_path / "prompts" / "sentiment.safetensors").meta.verbalizer == {"negative": "bad",
                                                                                         "positive": "good"}


def test_readme_accelerate_config_is_the_one_shipped():
    body = _section("Distributed training and large models")
    for path in re.findall(r"--config_file ([\w/.-]+)", body):
        assert (README.parent / path).is_file(), path
