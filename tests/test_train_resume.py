"""A run killed with SIGKILL and resumed ends bit-for-bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt import load_prompt
from softprompt.train.checkpoint import load_checkpoint
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from trainkit import easy_classification, learnable_model_dir

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_root):
    root = tmp_path_factory.mktemp("resume")
    model = learnable_model_dir(model_root / "learnable")
    train_file, dev_file = easy_classification(root / "data", n_train=40, n_dev=8)
    return root, model, train_file, dev_file


def _cmd(model, train_file, dev_file, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "softprompt", "train", "--data", str(train_file), "--eval", str(dev_file),
            "--model", str(model), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--prompt-length", "4", "--lr", "0.1", "--eval-every", "10", "--patience", "none",
            "--checkpoint-every", "5", "--prompt-dtype", "float32", "--quiet", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_sigkill_then_resume_equals_uninterrupted(setup):
    root, model, train_file, dev_file = setup
    full = root / "full" / "p.safetensors"
    r = subprocess.run(_cmd(model, train_file, dev_file, full), env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr

    cut = root / "cut" / "p.safetensors"
    ckpt = cut.parent / "p.run" / "checkpoint.safetensors"
    proc = subprocess.Popen(_cmd(model, train_file, dev_file, cut), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file():
            step = load_checkpoint(ckpt).step
            if step >= 10:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not cut.exists()  # killed before the end: no prompt file yet
    assert load_checkpoint(ckpt).step < STEPS

    r = subprocess.run(_cmd(model, train_file, dev_file, cut, "--resume"), env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    a, b = load_prompt(full), load_prompt(cut)
    assert torch.equal(a.tensor, b.tensor)  # bit for bit (float32 storage)
    ca, cb = load_checkpoint(full.parent / "p.run" / "checkpoint.safetensors"), load_checkpoint(ckpt)
    assert ca.step == cb.step == STEPS
    for x, y in zip(ca.prompts + ca.best_prompts, cb.prompts + cb.best_prompts):
        assert torch.equal(x, y)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ca.optimizer["state"][0][k], cb.optimizer["state"][0][k])
    la, lb = _losses(full.parent / "p.run"), _losses(cut.parent / "p.run")
    assert [s for s, _ in lb] == list(range(1, STEPS + 1))  # each step logged once, even those redone
    assert la == lb
    assert a.meta.training["best_step"] == b.meta.training["best_step"]
    assert a.meta.training["examples"] == b.meta.training["examples"] == STEPS * 4


def test_resume_refuses_other_settings_or_data(setup, tmp_path):
    root, model, train_file, dev_file = setup
    out = tmp_path / "p.safetensors"
    kw = dict(data=str(train_file), model=str(model), out=str(out), max_steps=4, batch_size=4, prompt_length=4,
              checkpoint_every=2, quiet=True)
    train(TrainConfig(**kw))
    with pytest.raises(ConfigError, match=r"other settings \(--lr"):
        train(TrainConfig(**kw, lr=0.5, resume=True))
    changed = tmp_path / "other.jsonl"
    changed.write_text(Path(train_file).read_text().replace("fell", "rose"))
    with pytest.raises(ConfigError, match="other training data"):
        train(TrainConfig(**{**kw, "data": str(changed)}, resume=True))


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(setup, tmp_path):
    """Upgrading softprompt mid-run: settings the checkpoint lacks (options added since) count as
    their defaults; given another value they still refuse."""
    from softprompt.train.checkpoint import save_checkpoint

    root, model, train_file, dev_file = setup
    out = tmp_path / "p.safetensors"
    kw = dict(data=str(train_file), model=str(model), out=str(out), max_steps=4, batch_size=4, prompt_length=4,
              checkpoint_every=2, quiet=True)
    train(TrainConfig(**kw))
    ckpt = tmp_path / "p.run" / "checkpoint.safetensors"
    state = load_checkpoint(ckpt)
    added = ("method", "reparam", "reparam_hidden", "class_weights", "sampling", "select_metric")
    for k in added:  # what a checkpoint written before #14 holds
        state.info["settings"].pop(k)
    for t in state.info["settings"]["tasks"]:
        t.pop("method")
    save_checkpoint(ckpt, state)
    with pytest.raises(ConfigError, match=r"other settings \(--sampling 'uniform' -> 'balanced'"):
        train(TrainConfig(**kw, sampling="balanced", resume=True))
    train(TrainConfig(**kw, resume=True))
