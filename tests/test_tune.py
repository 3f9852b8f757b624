"""softprompt tune: the study runs its trials on dev data, keeps the best trial's prompt with the search
in its metadata, prunes on dev evaluations, stops at the budget; train()'s on_eval hook it is built on;
bad flags are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt import load_prompt
from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from softprompt.tune import TuneConfig, best_trial, read_trials, tune
from softprompt.tune.trials import TrialRecord
from trainkit import learnable_model_dir

pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")


def train_cfg(tmp_path, data, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp_path / "out" / "best.safetensors"), max_steps=6, batch_size=8,
                prompt_length=4, quiet=True, precision="fp32", patience=None, eval_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_on_eval_sees_every_dev_evaluation_and_can_stop_the_run(tmp_path, learn, easy):
    train_file, dev_file = easy
    seen = []
    r = train(train_cfg(tmp_path, train_file, eval=str(dev_file)), base=learn,
              on_eval=lambda dev: seen.append((dev.step, dev.score("best"), dev.select_metric["best"])) or False)
    evals = [h for h in r.history if "eval" in h]
    assert [s for s, _, _ in seen] == [e["step"] for e in evals] == [2, 4, 6]
    assert [v for _, v, _ in seen] == [e["eval"]["best"]["accuracy"] for e in evals]
    assert {m for _, _, m in seen} == {"accuracy"}
    stopped = train(train_cfg(tmp_path / "stop", train_file, eval=str(dev_file)), base=learn,
                    on_eval=lambda dev: dev.step >= 4)
    assert stopped.steps == 4 and not stopped.stopped_early and not stopped.out_of_time
    t = load_prompt(stopped.path, learn).meta.training
    assert t["stopped_by"] == "on_eval" and t["steps"] == 4 and t["planned_steps"] == 6


def test_search_runs_its_trials_and_keeps_the_best(tmp_path, learn, easy):
    train_file, dev_file = easy
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file)), budget="1h", trials=4,
                   methods="prompt,prefix", prompt_lengths=[2, 4], pruner="none")
    r = tune(c, base=learn)
    rows = read_trials(r.run_dir / "trials.jsonl")
    assert len(rows) == len(r.trials) == 4 and r.stopped_by == "trials"
    assert [row["params"]["method"] for row in rows[:2]] == ["prompt", "prefix"]  # known-good recipes first
    assert [row["params"]["lr"] for row in rows[:2]] == [0.1, 0.01]
    assert all(row["state"] == "complete" and row["metric"] == "accuracy" and row["evals"] for row in rows)
    assert all(row["params"]["prompt_length"] in (2, 4) and 0.001 <= row["params"]["lr"] <= 0.5 for row in rows)
    for row in rows:  # a trial's value is its best dev evaluation, and its prompt file says the same
        assert row["value"] == max(e["value"] for e in row["evals"])
        assert load_prompt(row["prompt"]).meta.training["best_metric"] == row["value"]
    best = max(rows, key=lambda row: (row["value"], -row["number"]))
    loaded = load_prompt(r.path, learn)
    t = loaded.meta.training
    assert r.best.number == best["number"] and t["best_metric"] == best["value"]
    assert loaded.meta.method == best["params"]["method"] and loaded.meta.length == best["params"]["prompt_length"]
    assert t["config"]["lr"] == best["params"]["lr"] and loaded.meta.name == "best"
    s = t["search"]
    assert s["trials"] == 4 and s["completed"] == 4 and s["pruned"] == 0 and s["best_trial"] == best["number"]
    assert s["best"] == best["params"] and s["budget"] == 3600.0 and s["metric"] == "accuracy"
    assert s["trials_file"] == str(r.run_dir / "trials.jsonl")
    assert (load_prompt(best["prompt"]).tensor == loaded.tensor).all()


def test_the_same_seed_searches_the_same_recipes(tmp_path, learn, easy):
    train_file, dev_file = easy
    runs = [tune(TuneConfig(train=train_cfg(tmp_path / str(i), train_file, eval=str(dev_file), max_steps=2),
                            budget="1h", trials=4, methods="prompt", pruner="none"), base=learn) for i in range(2)]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]
    assert len({t.params["lr"] for t in runs[0].trials}) == 4  # explored beyond the first recipe


class AlwaysPrune:
    """An Optuna pruner that prunes at every report."""

    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_stops_at_its_first_dev_evaluation(tmp_path, learn, easy):
    import optuna

    train_file, dev_file = easy
    pruner = type("AlwaysPrune", (optuna.pruners.BasePruner,), {"prune": AlwaysPrune.prune})()
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file)), budget="1h", trials=2, methods="prompt")
    r = tune(c, base=learn, pruner=pruner)
    rows = read_trials(r.run_dir / "trials.jsonl")
    assert [row["state"] for row in rows] == ["pruned", "pruned"]
    assert all(row["steps"] == 2 and len(row["evals"]) == 1 and row["stopped_by"] == "on_eval" for row in rows)
    s = load_prompt(r.path, learn).meta.training["search"]
    assert s["pruned"] == 2 and s["completed"] == 0  # the best pruned trial's prompt is still written


def test_the_budget_stops_the_search(tmp_path, learn, easy):
    train_file, dev_file = easy
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file), max_steps=None), budget=1e-3,
                   trials=5, methods="prompt", pruner="none")
    r = tune(c, base=learn)
    assert r.stopped_by == "budget" and len(r.trials) == 1  # the first trial always runs
    assert r.trials[0].steps == r.trials[0].planned_steps == 1  # planned to fit its share: nothing else does
    assert load_prompt(r.path, learn).meta.training["search"]["stopped_by"] == "budget"


def test_a_budget_with_room_for_one_minimal_trial_gives_it_to_the_first_recipe(tmp_path, learn, easy, monkeypatch):
    import softprompt.tune.search as search

    train_file, dev_file = easy  # 48 rows: 10 passes are 60 steps, so a minimal trial is 60 steps here
    monkeypatch.setattr(search, "probe_step", lambda config, base: (10.0, 7.5, 0.0))  # 10 s a step, 7.5 s an evaluation
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file), max_steps=None, eval_every=None),
                   budget=1000, trials=3, pruner="none")
    r = tune(c, base=learn)
    first, *later = r.trials
    # 60 steps x 10 s + one evaluation fit 1000 s once: the first trial is planned for all of it (not 1000 / 3)
    assert first.params == {"method": "prefix", "lr": 0.01, "prompt_length": 4}  # the deep prompt's recipe first
    assert 900 < first.max_time <= 1000 and first.planned_steps == 60
    # its own steps were fast (measured now), so the time it left is shared by the other two as usual
    assert len(later) == 2 and 400 < later[0].max_time <= 500


def test_a_trial_refits_tunes_plan_to_its_own_pace(tmp_path, learn, easy, monkeypatch):
    """tune plans a trial from its probe; a probe that read the machine 1000x slower than the trial runs
    (a loaded moment) would leave most of the share unused: the trial re-fits at its first evaluation."""
    import softprompt.tune.search as search

    train_file, dev_file = easy  # 48 rows: at most 60 steps
    monkeypatch.setattr(search, "probe_step", lambda config, base: (10.0, 7.5, 0.0))
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file), max_steps=None, eval_every=None),
                   budget=400, trials=1, pruner="none")
    (trial,) = tune(c, base=learn).trials
    records = [json.loads(line) for line in (Path(trial.prompt).parent / "metrics.jsonl").read_text().splitlines()]
    (refit,) = [r for r in records if "refit" in r]
    assert refit["refit"]["planned_steps"] < 40 and refit["refit"]["steps"] == 60  # tune's plan, then the data's cap
    assert trial.planned_steps == trial.steps == 60


def test_trials_share_the_time_but_never_below_a_minimal_trial():
    from softprompt.tune import min_trial_seconds, trials_that_fit

    assert min_trial_seconds(100, 2.5, 30.0) == 280.0
    assert trials_that_fit(480, 8, 280.0) == 1  # LoRA's 100-step time on tweets: one trial, the whole budget
    assert trials_that_fit(1200, 8, 280.0) == 4
    assert trials_that_fit(10**6, 8, 280.0) == 8  # --trials still caps it
    assert trials_that_fit(100, 8, 280.0) == 1  # too short for one: the first trial takes what there is
    assert trials_that_fit(100, 3, 0.0) == 3


def test_best_trial_is_the_best_value_in_the_metric_direction():
    def rec(n, v):
        return TrialRecord(number=n, state="complete", params={}, metric="m", value=v, best_step=1)

    rs = [rec(0, 0.5), rec(1, 0.7), rec(2, 0.7), rec(3, 0.2)]
    assert best_trial(rs, 1).number == 1 and best_trial(rs, -1).number == 3


def _cli(tmp_path, easy, *extra):
    train_file, dev_file = easy
    return ["tune", "--data", str(train_file), "--out", str(tmp_path / "p.safetensors"), *extra]


@pytest.mark.parametrize("extra, message", [
    ((), "--budget is required"),
    (("--budget", "soon", "--eval-split", "0.2"), "--budget 'soon': give seconds"),
    (("--budget", "0", "--eval-split", "0.2"), "--budget must be a positive duration"),
    (("--budget", "1m", "--eval-split", "0.2", "--trials", "0"), "--trials must be at least 1"),
    (("--budget", "1m"), "tune compares trials on dev data: give --eval FILE or --eval-split"),
    (("--budget", "1m", "--eval-split", "0.2", "--methods", "prompt,lora"), "--methods prompt,lora: give distinct"),
    (("--budget", "1m", "--eval-split", "0.2", "--prompt-lengths", "10,x"), "--prompt-lengths '10,x': give whole"),
    (("--budget", "1m", "--eval-split", "0.2", "--prompt-lengths", "0"), "--prompt-lengths must be whole numbers"),
    (("--budget", "1m", "--eval-split", "0.2", "--min-trial-steps", "0"), "--min-trial-steps must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, easy, capsys, extra, message):
    assert main(_cli(tmp_path, easy, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt tune: error: ") and message in err[0], err


@pytest.mark.parametrize("flag", ["--lr", "--max-time", "--resume", "--task-file", "--launcher"])
def test_flags_the_search_sets_are_not_taken(tmp_path, easy, capsys, flag):
    with pytest.raises(SystemExit):
        main(_cli(tmp_path, easy, "--budget", "1m", flag, "x"))
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_python_api_refuses_what_the_search_sets(tmp_path, easy):
    train_file, dev_file = easy
    for kw, message in ((dict(max_time="1m"), "--max-time"), (dict(reparam="residual"), "--reparam")):
        with pytest.raises(ConfigError, match=message):
            TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file), **kw), budget="1m")


def test_cli_runs_a_search(tmp_path, easy, model_root, capsys):
    learnable_model_dir(model_root / "learnable")
    args = _cli(tmp_path, easy, "--model", str(model_root / "learnable"), "--eval-split", "0.25", "--budget", "10m",
                "--trials", "2", "--methods", "prefix", "--max-steps", "2", "--prompt-length", "2", "--precision",
                "fp32", "--device", "cpu", "--calibrate", "auto")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "trial 0: prefix lr 0.01" in err and "best: trial" in err
    rows = read_trials(tmp_path / "p.run" / "trials.jsonl")
    assert len(rows) == 2 and all(json.dumps(r) for r in rows)
    meta = load_prompt(tmp_path / "p.safetensors").meta
    assert meta.method == "prefix" and meta.training["search"]["trials"] == 2
    assert meta.training["config"]["calibrate"] == "auto"


def test_an_interrupted_search_still_writes_the_best_finished_trial(tmp_path, learn, easy):
    import optuna

    class InterruptSecondTrial(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            if trial.number == 1:
                raise KeyboardInterrupt
            return False

    train_file, dev_file = easy
    c = TuneConfig(train=train_cfg(tmp_path, train_file, eval=str(dev_file)), budget="1h", trials=3, methods="prompt")
    with pytest.raises(KeyboardInterrupt):
        tune(c, base=learn, pruner=InterruptSecondTrial())
    s = load_prompt(c.train.out, learn).meta.training["search"]
    assert s["stopped_by"] == "interrupted" and s["trials"] == 1
    assert len(read_trials(c.run_path() / "trials.jsonl")) == 1


def test_init_from_must_fit_every_searched_recipe(tmp_path, learn, easy):
    import torch

    from softprompt.artifact import PromptMeta, save_prompt

    train_file, dev_file = easy
    src = save_prompt(tmp_path / "src.safetensors", torch.randn(4, learn.dim) * 0.01,
                      PromptMeta.for_base(learn, 4, task="classify"))
    c = train_cfg(tmp_path, train_file, eval=str(dev_file), init_from=str(src))
    assert TuneConfig(train=c, budget="1m", methods="prompt,residual").methods == ["prompt", "residual"]
    with pytest.raises(ConfigError, match=r"holds a prompt prompt: search only --methods prompt,residual"):
        TuneConfig(train=c, budget="1m")
    with pytest.raises(ConfigError, match="holds 4 virtual tokens: give --prompt-length 4"):
        TuneConfig(train=c, budget="1m", methods="prompt", prompt_lengths=[4, 8])


def test_plan_steps_fits_training_and_evaluations_in_the_share():
    from softprompt.train.budget import plan_steps

    assert plan_steps(100, 1.0, 0.0, 10**6, 8, None) == (100, 20)  # evaluations for free: 5 of them
    assert plan_steps(100, 1.0, 4.0, 10**6, 8, None) == (80, 16)  # 5 evaluations of 4 s: 80 + 5 x 4 = 100
    assert plan_steps(100, 1.0, 10.0, 10**6, 8, None) == (80, 40)  # 2 evaluations fit a quarter of the share
    assert plan_steps(100, 1.0, 60.0, 10**6, 8, None) == (40, 40)  # even one is dearer: one, at the end
    assert plan_steps(100, 1.0, 4.0, 10**6, 8, 10) == (70, 10)  # --eval-every 10: 70 + 7 x 4 <= 100 < 71 + 8 x 4
    assert plan_steps(100, 1.0, 0.0, 80, 8, None) == (100, 20)  # 10 passes over 80 rows = 100 steps
    assert plan_steps(100, 1.0, 0.0, 40, 8, None) == (50, 10)
    assert plan_steps(5, 1.0, 60.0, 10**6, 8, None) == (1, 1)  # nothing fits: one step


def test_generation_is_searched_by_rouge_l(tmp_path, learn):
    from trainkit import easy_generation

    data = easy_generation(tmp_path / "data", n=24)
    c = TuneConfig(train=TrainConfig(data=str(data), task="generate", eval_split=0.25, out=str(tmp_path / "g.safetensors"),
                                     max_steps=2, batch_size=4, prompt_length=2, quiet=True, precision="fp32",
                                     max_target_length=4, eval_every=1), budget="1h", trials=2, methods="prompt,prefix")
    r = tune(c, base=learn)
    assert [t.metric for t in r.trials] == ["rouge_l", "rouge_l"]
    assert r.best.value == max(t.value for t in r.trials)
    assert load_prompt(r.path, learn).meta.training["search"]["metric"] == "rouge_l"
