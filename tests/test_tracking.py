"""Experiment trackers (--report-to): TensorBoard event files and MLflow's local store read back
through their own readers after a real training run; the same numbers at the same steps as
metrics.jsonl; the main process only; bad names and missing packages refused before anything runs."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.distributed import LocalRuntime
from softprompt.train.tracking import flat_config, parse_report_to, scalars
from softprompt.train import TrainConfig, train
from trainkit import easy_classification

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow store (SQLite file, MLflow 3's default kind) for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    return uri


def cfg(tmp_path, **kw) -> TrainConfig:
    train_file, dev_file = easy_classification(tmp_path / "data")
    base = dict(data=str(train_file), eval=str(dev_file), out=str(tmp_path / "out" / "topic.safetensors"), max_steps=6,
                batch_size=8, prompt_length=4, lr=0.3, quiet=True, precision="fp32", eval_every=2, patience=None)
    base.update(kw)
    return TrainConfig(**base)


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def history(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What every tracker must hold: each record's scalars at its step."""
    out: dict[str, list] = {}
    for r in records:
        for k, v in scalars(r).items():
            out.setdefault(k, []).append((r["step"], v))
    return out


def test_scalars_and_flat_config_are_pure():
    assert scalars({"step": 3, "loss": 0.5, "lr": 0.1, "examples": 24, "examples_per_s": 80.0, "elapsed": 1.0}) == {
        "train/loss": 0.5, "train/lr": 0.1, "train/examples": 24.0, "train/examples_per_s": 80.0, "train/elapsed": 1.0}
    assert scalars({"step": 4, "eval": {"topic": {"accuracy": 1.0, "macro_f1": 0.9, "per_class": {}}, "h": {"rouge_l": 0.2}},
                    "improved": True}) == {"eval/topic/accuracy": 1.0, "eval/topic/macro_f1": 0.9, "eval/h/rouge_l": 0.2}
    assert flat_config({"lr": 0.1, "labels": ["a", "b"], "x": None, "tasks": [{"name": "t", "eval": None}]}) == {
        "lr": 0.1, "labels": '["a", "b"]', "x": "null", "tasks.0.name": "t", "tasks.0.eval": "null"}


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(tmp_path, learn, mlflow_store):
    from mlflow import MlflowClient

    result = train(cfg(tmp_path, report_to="tensorboard,mlflow", run_name="topic-run"), base=learn)
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    want = history(records)
    assert set(want) >= {"train/loss", "train/lr", "train/examples_per_s", "eval/topic/accuracy", "eval/topic/log_loss"}
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in want["eval/topic/accuracy"]] == [2, 4, 6]

    # TensorBoard: event files read back with tensorboard's own reader (float32 values)
    got, acc = tb_scalars(result.run_dir / "tensorboard" / "topic-run")
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.3' in text and '"train_examples": 48' in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == 0.3 and hp["tasks.0.name"].string_value == "topic"  # the HParams dashboard

    # MLflow: the local store read back through its client
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "topic-run" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.3" and run.data.params["tasks.0.name"] == "topic"
    assert run.data.params["planned_steps"] == "6" and run.data.params["run_dir"] == str(result.run_dir)
    for tag, points in want.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert hist == points, tag  # exact: MLflow keeps doubles
    assert json.loads((result.run_dir / "trackers.json").read_text()) == {"mlflow": run.info.run_id}


def test_resume_continues_the_same_runs(tmp_path, learn, mlflow_store, monkeypatch):
    """Killed after step 4 (checkpoint at 4), resumed: one MLflow run, TensorBoard purged and continued."""
    from mlflow import MlflowClient

    import softprompt.train.loop as tr

    real, calls = tr.row_losses, [0]

    def dies_at_step_5(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "row_losses", dies_at_step_5)
    c = cfg(tmp_path, report_to=["tensorboard", "mlflow"], checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(c, base=learn)
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED"
    monkeypatch.setattr(tr, "row_losses", real)
    result = train(cfg(tmp_path, report_to=["tensorboard", "mlflow"], checkpoint_every=2, resume=True), base=learn)
    (again,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps[-2:] == [5, 6] and set(steps) == {1, 2, 3, 4, 5, 6}
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, _ = tb_scalars(result.run_dir / "tensorboard" / "topic")
    assert got["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in history(records)["train/loss"]]


def test_only_the_main_process_reports(tmp_path, learn, mlflow_store):
    class NotMain(LocalRuntime):
        is_main = False

    train(cfg(tmp_path, report_to="tensorboard,mlflow", max_steps=2, eval_every=1), base=learn, runtime=NotMain())
    assert not (tmp_path / "out" / "topic.run" / "tensorboard").exists()
    assert not (tmp_path / "mlflow.db").exists()  # the store was never opened


def test_bad_tracker_settings_are_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    assert parse_report_to("none") == [] and parse_report_to(None) == [] and parse_report_to("") == []
    assert parse_report_to("TensorBoard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    for value, msg in [("tensorbord", r"--report-to: unknown tracker 'tensorbord'; choose from tensorboard, mlflow"),
                       ("none,mlflow", "'none' cannot be combined")]:
        with pytest.raises(ConfigError, match=msg):
            parse_report_to(value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ConfigError, match=r"^--report-to mlflow needs the mlflow package: "
                                          r"pip install 'softprompt\[mlflow\]'$"):
        parse_report_to("tensorboard,mlflow")
    assert "mlflow" not in parse_report_to("all")
    train_file, _ = easy_classification(tmp_path / "data")
    for flags, msg in [(["--report-to", "comet"], "unknown tracker 'comet'"),
                       (["--report-to", "mlflow"], "pip install 'softprompt[mlflow]'"),
                       (["--run-name", "a/b"], "--run-name must be non-empty, without slashes")]:
        code = main(["train", "--data", str(train_file), "--out", str(tmp_path / "out" / "p.safetensors"),
                     "--model", "/nonexistent/model", *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_tracker_failing_mid_run_is_dropped_and_training_goes_on(tmp_path, learn, monkeypatch, capsys):
    import softprompt.train.tracking as tracking

    class Flaky(tracking.Tracker):
        def __init__(self, info):
            self.calls = 0

        def log(self, metrics, step):
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("server went away\nmore detail")

        def finish(self, status):
            raise AssertionError("a dropped tracker is not closed")

    monkeypatch.setitem(tracking.TRACKERS, "flaky", tracking.Backend("json", "flaky", "flaky", Flaky))
    result = train(cfg(tmp_path, report_to="flaky,tensorboard", quiet=False), base=learn)
    assert result.steps == 6 and result.path.is_file()
    err = capsys.readouterr().err
    assert err.count("--report-to flaky: logging failed (server went away); training goes on without it") == 1
    got, _ = tb_scalars(result.run_dir / "tensorboard" / "topic")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]  # the other tracker got everything


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as read, whatever the terminal's width
    assert "--report-to" in out and "--run-name" in out and "tensorboard, mlflow, wandb" in out
    assert "hf:NAME[/CONFIG][:SPLIT]" in out and ".parquet" in out


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, learn, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file://" + str(tmp_path / "mlruns"))  # refused by MLflow 3 unless opted in
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"^--report-to mlflow: cannot start the tracker \(") as e:
        train(cfg(tmp_path, report_to="tensorboard,mlflow"), base=learn)
    assert "\n" not in str(e.value)
    got, acc = tb_scalars(tmp_path / "out" / "topic.run" / "tensorboard" / "topic")
    assert got == {}  # the tracker opened first was closed, with nothing logged


def test_wandb_offline_run_holds_every_metric(tmp_path, learn, monkeypatch):
    """W&B without its servers: offline mode writes the run's transaction log under the run
    directory; its records are protobuf, so the metric names and the run name are in it as text."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    result = train(cfg(tmp_path, report_to="wandb", run_name="wb-run", max_steps=4), base=learn)
    (log,) = list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [k.encode() for k in history(records)]
    deadline = time.monotonic() + 30  # wandb-core (its own process) may still be flushing after finish()
    while not all(k in (data := log.read_bytes()) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.1)
    for key in keys:
        assert key in data, key
    assert b"wb-run" in data and b"planned_steps" in data and b"train_examples" in data  # run name, config
    run_id = json.loads((result.run_dir / "trackers.json").read_text())["wandb"]
    assert log.name == f"run-{run_id}.wandb"
