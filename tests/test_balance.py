"""Imbalanced labels (#14): class weights, class-balanced batches, selection by macro-F1, their
checks, and resume with them on. Tiny random models; each test would fail if the option were ignored."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from softprompt import load_prompt
from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from softprompt.train import loop
from softprompt.train.balance import AUTO_RATIO, CLASS_WEIGHTS, resolve_task
from softprompt.train.checkpoint import load_checkpoint
from softprompt.train.schedule import SAMPLINGS, balanced_batch_at
from trainkit import BUSINESS, SPORTS, easy_generation, learnable_model_dir, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed(folder: Path, n_major: int = 32, n_minor: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Two classes, ``n_major`` business rows to ``n_minor`` sports rows: train.jsonl and dev.jsonl."""
    r = random.Random(seed)
    rows = ([{"text": r.choice(BUSINESS), "label": "business"} for _ in range(n_major)]
            + [{"text": r.choice(SPORTS), "label": "sports"} for _ in range(n_minor)])
    r.shuffle(rows)
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "dev.jsonl", rows[:10])


@pytest.fixture(scope="module")
def model(model_root):
    return learnable_model_dir(model_root / "learnable")


def _kw(model, train_file, dev_file, out: Path, **extra) -> dict:
    return dict(data=str(train_file), eval=str(dev_file) if dev_file else None, model=str(model), out=str(out),
                batch_size=4, prompt_length=4, prompt_dtype="float32", quiet=True, **extra)


# ----------------------------------------------------------------------------- pure


def test_balanced_weights_are_inverse_frequency_with_mean_one():
    counts = [60, 30, 10]
    w = CLASS_WEIGHTS["balanced"](counts)
    assert w == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    assert sum(c * x for c, x in zip(counts, w)) / sum(counts) == pytest.approx(1.0)  # loss scale unchanged
    assert CLASS_WEIGHTS["balanced"]([5, 0, 5]) == [1.0, 0.0, 1.0]  # a label with no rows: no weight, no div by 0
    assert CLASS_WEIGHTS["none"](counts) == [1.0, 1.0, 1.0]


def test_auto_switches_on_beyond_the_ratio_only():
    labels = ["a", "b", "c"]
    skew = resolve_task("classify", labels, ["a"] * 65 + ["b"] * 25 + ["c"] * 10, "auto", "auto", "uniform")
    assert skew.ratio == 6.5 and skew.class_weights == "balanced" and skew.select_metric == "macro_f1"
    assert skew.weight_of(2) == pytest.approx(100 / 30) and skew.weight_of([1, 2]) == 1.0
    even = resolve_task("classify", labels, ["a"] * 30 + ["b"] * 30 + ["c"] * int(30 / AUTO_RATIO), "auto", "auto",
                        "uniform")
    assert even.class_weights == "none" and even.select_metric == "accuracy" and even.weights == [1.0] * 3
    forced = resolve_task("classify", labels, ["a", "b", "c"], "balanced", "log_loss", "uniform")
    assert forced.class_weights == "balanced" and forced.direction == -1
    gen = resolve_task("generate", None, ["x", "y"], "auto", "auto", "uniform")
    assert gen.weights == [] and gen.select_metric == "rouge_l" and gen.weight_of([3, 4]) == 1.0


def test_balanced_sampling_draws_each_class_equally_and_is_a_function_of_seed_and_step():
    keys = [(0, 0)] * 80 + [(0, 1)] * 15 + [(0, 2)] * 5  # 80 / 15 / 5
    seen = Counter(keys[i][1] for step in range(300) for i in balanced_batch_at(step, keys, 8, seed=3))
    assert all(abs(seen[c] / 2400 - 1 / 3) < 0.04 for c in range(3)), seen
    cache: dict = {}
    assert [balanced_batch_at(s, keys, 8, 3, cache) for s in range(5)] == [balanced_batch_at(s, keys, 8, 3)
                                                                          for s in range(5)]
    assert balanced_batch_at(7, keys, 8, 3) != balanced_batch_at(7, keys, 8, 4)
    uniform = Counter(keys[i][1] for step in range(12) for i in SAMPLINGS["uniform"](step, [5] * 100, keys, 8, 3, {}))
    assert uniform[2] < 12  # the plain order keeps the skew (about 5 of 96)


def test_balanced_sampling_keeps_each_tasks_share():
    keys = [(0, 0)] * 270 + [(0, 1)] * 30 + [(1, None)] * 100  # task 0: 75% of rows; task 1 generation
    rows = [i for step in range(300) for i in balanced_batch_at(step, keys, 8, seed=0)]
    tasks = Counter(keys[i][0] for i in rows)
    assert abs(tasks[0] / len(rows) - 0.75) < 0.03
    classes = Counter(keys[i][1] for i in rows if keys[i][0] == 0)
    assert abs(classes[0] - classes[1]) / tasks[0] < 0.06


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("field, value, flag", [("class_weights", "inverse", "--class-weights"),
                                                ("sampling", "stratified", "--sampling"),
                                                ("select_metric", "f1", "--select-metric")])
def test_bad_values_are_one_line_errors_naming_the_flag(tmp_path, field, value, flag):
    train_file, _ = skewed(tmp_path)
    with pytest.raises(ConfigError, match=rf"^{flag} '{value}': choose one of [a-z0-9_, ]+$"):
        TrainConfig(data=str(train_file), model="/no/such/model", **{field: value})  # no model is loaded


def test_class_options_refused_for_generation(tmp_path):
    gen = easy_generation(tmp_path)
    for kw, flag in ((dict(class_weights="balanced"), "--class-weights"), (dict(sampling="balanced"), "--sampling"),
                     (dict(select_metric="macro_f1"), "--select-metric")):
        with pytest.raises(ConfigError, match=rf"^{flag} .* needs a classification task"):
            TrainConfig(data=str(gen), task="generate", **kw)
    TrainConfig(data=str(gen), task="generate")  # the defaults (none, uniform, auto) are fine


def test_defaults_change_only_the_selection_on_skewed_labels(tmp_path):
    """README "Imbalanced labels": by default a skewed task keeps its best prompt by macro-F1 and trains as before."""
    train_file, _ = skewed(tmp_path)
    cfg = TrainConfig(data=str(train_file))
    assert (cfg.class_weights, cfg.sampling, cfg.select_metric) == ("none", "uniform", "auto")
    b = resolve_task("classify", ["business", "sports"], ["business"] * 32 + ["sports"] * 8, cfg.class_weights,
                     cfg.select_metric, cfg.sampling)
    assert b.select_metric == "macro_f1" and b.weights == [1.0, 1.0]


def test_cli_refuses_a_bad_choice_before_loading(tmp_path, capsys):
    train_file, _ = skewed(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(train_file), "--out", str(tmp_path / "p.safetensors"), "--model", "/no/such",
              "--class-weights", "inverse"])
    assert e.value.code == 2 and "--class-weights: invalid choice: 'inverse'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in the loop


def test_class_weights_change_training_only_when_labels_are_skewed(tmp_path, model):
    """One step: balanced weights move the prompt differently on skewed data, identically on even data."""
    def prompt(folder, n_major, n_minor, cw):
        tr, _ = skewed(folder, n_major, n_minor)
        r = train(TrainConfig(**_kw(model, tr, None, folder / cw / "p.safetensors", max_steps=1,
                                    checkpoint_every=0, class_weights=cw)))
        return load_prompt(r.path)

    a, b = prompt(tmp_path / "skew", 32, 8, "none"), prompt(tmp_path / "skew", 32, 8, "balanced")
    assert not torch.equal(a.tensor, b.tensor)
    assert b.meta.training["balance"]["weights"] == {"business": 0.625, "sports": 2.5}
    assert a.meta.training["balance"]["weights"] == {"business": 1.0, "sports": 1.0}
    c, d = prompt(tmp_path / "even", 20, 20, "none"), prompt(tmp_path / "even", 20, 20, "balanced")
    assert torch.equal(c.tensor, d.tensor)


def test_multi_task_weights_are_per_task(tmp_path, model):
    t1, d1 = skewed(tmp_path / "a", 32, 8)
    t2, d2 = skewed(tmp_path / "b", 10, 30)
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({"tasks": [{"name": "a", "data": str(t1)}, {"name": "b", "data": str(t2)}]}))
    r = train(TrainConfig(task_file=str(task_file), model=str(model), out=str(tmp_path / "out"), max_steps=1,
                          batch_size=4, prompt_length=4, quiet=True, checkpoint_every=0, class_weights="balanced"))
    wa = load_prompt(r.paths["a"]).meta.training["balance"]["weights"]
    wb = load_prompt(r.paths["b"]).meta.training["balance"]["weights"]
    assert wa == {"business": 0.625, "sports": 2.5} and wb == {"business": 2.0, "sports": pytest.approx(2 / 3, 1e-5)}


SCRIPT = [  # (accuracy, macro_f1, log_loss) of the three dev evaluations
    (0.80, 0.40, 0.50),
    (0.70, 0.65, 0.60),
    (0.75, 0.55, 0.40),
]


@pytest.mark.parametrize("metric, best", [("accuracy", 2), ("macro_f1", 4), ("log_loss", 6), ("auto", 4)])
def test_selection_keeps_the_checkpoint_best_by_the_select_metric(tmp_path, model, monkeypatch, metric, best):
    """Scripted dev results: each select metric keeps a different evaluation (auto: the labels are 4:1)."""
    calls = []

    def scripted(pm, prompts, tasks, *a, **k):
        acc, f1, ll = SCRIPT[len(calls)]
        calls.append(prompts[0].detach().clone())
        return {tasks[0].name: {"accuracy": acc, "macro_f1": f1, "log_loss": ll, "n": 10}}

    monkeypatch.setattr(loop, "_eval_tasks", scripted)
    tr, dv = skewed(tmp_path)
    r = train(TrainConfig(**_kw(model, tr, dv, tmp_path / "p.safetensors", max_steps=6, eval_every=2, patience=None,
                                checkpoint_every=0, select_metric=metric)))
    assert len(calls) == 3 and r.best_step["p"] == best
    saved = load_prompt(r.path)
    assert torch.equal(saved.tensor, calls[best // 2 - 1])  # the prompt of that evaluation, not the last
    assert saved.meta.training["metric"] == (metric if metric != "auto" else "macro_f1")
    evals = [h for h in r.history if "eval" in h]
    assert [h["select_metric"]["p"] for h in evals] == [saved.meta.training["metric"]] * 3


def test_early_stopping_follows_the_select_metric(tmp_path, model, monkeypatch):
    """macro-F1 falling while accuracy rises stops the run (patience 1)."""
    script = iter([(0.6, 0.6), (0.7, 0.5), (0.8, 0.4)])

    def scripted(pm, prompts, tasks, *a, **k):
        acc, f1 = next(script)
        return {tasks[0].name: {"accuracy": acc, "macro_f1": f1, "log_loss": 0.5, "n": 10}}

    monkeypatch.setattr(loop, "_eval_tasks", scripted)
    tr, dv = skewed(tmp_path)
    kw = _kw(model, tr, dv, tmp_path / "f1.safetensors", max_steps=6, eval_every=2, patience=1, checkpoint_every=0)
    r = train(TrainConfig(**kw, select_metric="macro_f1"))
    assert r.stopped_early and r.steps == 4 and r.best_step["f1"] == 2


def test_resume_is_bit_exact_with_the_imbalance_options(tmp_path, model, monkeypatch):
    tr, dv = skewed(tmp_path)
    opts = dict(max_steps=12, eval_every=4, patience=None, checkpoint_every=2, class_weights="balanced",
                sampling="balanced", select_metric="macro_f1")
    full = train(TrainConfig(**_kw(model, tr, dv, tmp_path / "full" / "p.safetensors", **opts)))

    real = loop._train_step

    def dies_at_7(run, state, step):
        if step == 7:
            raise KeyboardInterrupt  # a kill between checkpoints (the last one: step 6)
        return real(run, state, step)

    cut_out = tmp_path / "cut" / "p.safetensors"
    monkeypatch.setattr(loop, "_train_step", dies_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**_kw(model, tr, dv, cut_out, **opts)))
    assert load_checkpoint(cut_out.parent / "p.run" / "checkpoint.safetensors").step == 6
    monkeypatch.setattr(loop, "_train_step", real)
    cut = train(TrainConfig(**_kw(model, tr, dv, cut_out, **opts, resume=True)))

    a, b = load_prompt(full.path), load_prompt(cut.path)
    assert torch.equal(a.tensor, b.tensor)
    assert [h["loss"] for h in full.history if "loss" in h] == [h["loss"] for h in cut.history if "loss" in h]
    assert a.meta.training["best_step"] == b.meta.training["best_step"]
    assert a.meta.training["balance"] == b.meta.training["balance"]
    with pytest.raises(ConfigError, match="other settings"):  # another option is another run
        train(TrainConfig(**_kw(model, tr, dv, cut_out, **{**opts, "sampling": "uniform"}, resume=True)))
