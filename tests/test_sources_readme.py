"""The README's Data sources and Experiment trackers commands run (tiny model, two steps, data
built here; hub ids from a local datasets cache in offline mode)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from softprompt import load_prompt
from softprompt.cli import main
from datakit import NAMES, dataset, hub_cache, jsonl
from trainkit import easy_classification, learnable_model_dir

pytest.importorskip("datasets")
pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

README = Path(__file__).resolve().parents[1] / "README.md"
from docs_examples import page  # noqa: E402


def commands(section: str) -> list[str]:
    body = page(section)
    return [l.split("  #")[0].strip() for b in re.findall(r"```bash\n(.*?)```", body, re.S) for l in b.splitlines()
            if l.strip()]


def run(cmd: str, model: str, capsys, quiet_stderr: bool = False) -> str:
    """One README command through the CLI in this process; returns what it printed (or wrote to `> FILE`)."""
    cmd, _, redirect = cmd.partition(" > ")
    argv = shlex.split(cmd)[1:] + ["--model", model]
    if argv[0] == "train":
        argv += ["--max-steps", "2", "--prompt-length", "2", "--eval-every", "1", "--quiet", "--precision", "fp32"]
    else:
        argv += ["--precision", "fp32"]
    capsys.readouterr()
    assert main(argv) == 0, cmd
    out, err = capsys.readouterr()
    assert not quiet_stderr or err == "", err
    if redirect:
        Path(redirect.strip()).write_text(out)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def test_readme_data_source_commands_run_and_agree(tmp_path, model_root, monkeypatch, capsys):
    import datasets

    cmds = commands("Data sources")
    assert len(cmds) == 5 and sum(c.startswith("softprompt train") for c in cmds) == 3
    monkeypatch.chdir(tmp_path)
    dataset("train").to_parquet("train.parquet")
    dataset("validation").to_parquet("dev.parquet")
    datasets.DatasetDict({"train": dataset("train"), "validation": dataset("validation")}).save_to_disk("sst2-saved")
    cache = hub_cache(tmp_path / "hf-cache", "glue", "sst2", tmp_path / "hf-src")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # HF_DATASETS_OFFLINE=1
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    model = str(learnable_model_dir(model_root / "learnable"))
    # the reference: the same rows as JSONL
    jsonl(tmp_path / "train.jsonl"), jsonl(tmp_path / "dev.jsonl", "validation")
    run("softprompt train --data train.jsonl --eval dev.jsonl --text-field sentence --out ref.safetensors", model, capsys)
    ref = load_prompt("ref.safetensors")
    assert ref.meta.labels == NAMES
    for cmd in cmds:
        out = run(cmd, model, capsys)
        if cmd.startswith("softprompt train"):  # every form trains the very same prompt
            got = load_prompt("sst2.safetensors")
            assert torch.equal(got.tensor, ref.tensor), cmd
            assert got.meta.labels == NAMES and got.meta.training["best_step"] == ref.meta.training["best_step"]
        elif cmd.startswith("softprompt eval"):
            assert "hf:glue/sst2:validation: 4 examples" in out
    preds = [json.loads(l) for l in Path("predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(p["label"] in NAMES for p in preds)


def test_readme_tracker_commands_run(tmp_path, model_root, monkeypatch, capsys):
    from mlflow import MlflowClient

    pytest.importorskip("wandb")
    cmds = commands("Experiment trackers")
    assert any("--report-to tensorboard,mlflow" in c for c in cmds) and any("wandb" in c for c in cmds)
    monkeypatch.chdir(tmp_path)
    easy_classification(tmp_path / "bbc")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for k, v in {"MLFLOW_TRACKING_URI": uri, "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(k, raising=False)
    model = str(learnable_model_dir(model_root / "learnable"))
    for cmd in cmds:
        if cmd.startswith("softprompt "):
            run(cmd, model, capsys, quiet_stderr=True)  # --quiet: the trackers print nothing either
        else:  # tensorboard --logdir DIR: the folder it is pointed at holds the named run's events
            logdir = Path(shlex.split(cmd)[-1])
            assert list((logdir / "topic-lr0.1").glob("events.out.tfevents.*"))
    (run_,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("softprompt").experiment_id])
    assert run_.info.run_name == "topic-lr0.1" and run_.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_.info.run_id, "eval/topic/accuracy")] == [1, 2]
    assert list(Path("topic.run/wandb").glob("offline-run-*/run-*.wandb"))
