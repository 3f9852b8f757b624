"""--max-time and --max-steps auto: the budget stops the run, keeps the best dev prompt, says so in
the prompt file, and a resumed run goes on where it stopped."""

from __future__ import annotations

import pytest
import torch

from softprompt import load_prompt
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from softprompt.train.checkpoint import load_checkpoint
from softprompt.train.prepare import total_steps
from softprompt.train.budget import AUTO_MAX_STEPS, AUTO_MIN_STEPS, auto_steps, parse_duration

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp_path, data, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp_path / "out" / "p.safetensors"), max_steps=12, batch_size=8,
                prompt_length=4, lr=0.3, quiet=True, precision="fp32", patience=None, eval_every=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("text, seconds", [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0),
                                           (" 2M ", 120.0), (0.5, 0.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10d", "-5", "0", "0s", "nan", True, None])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_auto_steps_grows_with_data_and_budget_and_stays_bounded():
    assert auto_steps(80, 8, 3600) == max(AUTO_MIN_STEPS, 100)  # 10 epochs of 10 batches
    assert auto_steps(8000, 8, 3600) > auto_steps(800, 8, 3600)  # more data, more steps
    assert auto_steps(8000, 8, 60) < auto_steps(8000, 8, 600)  # a short budget plans fewer
    assert auto_steps(8, 8, 1) == AUTO_MIN_STEPS
    assert auto_steps(10**7, 8, 10**7) == AUTO_MAX_STEPS


def test_config_checks_the_budget_flags(tmp_path, easy):
    train_file, _ = easy
    assert cfg(tmp_path, train_file, max_time="15m").max_time == 900.0
    with pytest.raises(ConfigError, match="--max-time"):
        cfg(tmp_path, train_file, max_time="soon")
    with pytest.raises(ConfigError, match="--max-steps auto needs --max-time"):
        cfg(tmp_path, train_file, max_steps="auto")
    with pytest.raises(ConfigError, match="--max-steps"):
        cfg(tmp_path, train_file, max_steps="many")
    c = cfg(tmp_path, train_file, max_steps="auto", max_time=3600)
    assert total_steps(c, 48) == auto_steps(48, 8, 3600)


@pytest.mark.parametrize("planned, max_steps", [((0, 4, 1.0), "auto"), ((12, 0, 1.0), "auto"), ((12, 4, -1.0), "auto"),
                                                ((12.5, 4, 1.0), "auto"), ((12, 4), "auto"), ((12, 4, 1.0), 12)])
def test_a_callers_plan_is_checked_up_front(tmp_path, easy, planned, max_steps):
    """``planned`` is set by code (tune), not a flag; a bad one is still a one-line ConfigError."""
    with pytest.raises(ConfigError, match="planned"):
        cfg(tmp_path, easy[0], max_steps=max_steps, max_time=60, planned=planned)
    assert cfg(tmp_path, easy[0], max_steps="auto", max_time=60, planned=(12, 4, 0.5)).planned == (12, 4, 0.5)


def test_budget_stops_the_run_and_keeps_the_best_dev_prompt(tmp_path, learn, easy):
    train_file, dev_file = easy
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_time=1e-6), base=learn)
    assert r.steps == 1 and r.out_of_time and not r.stopped_early
    evals = [h for h in r.history if "eval" in h]
    assert [e["step"] for e in evals] == [1]  # the last step before the budget ran out is evaluated
    t = load_prompt(r.path, learn).meta.training
    assert t["stopped_by"] == "time" and t["max_time"] == 1e-6 and t["steps"] == 1 and t["planned_steps"] == 12
    assert t["best_step"] == 1


def test_no_budget_runs_all_steps(tmp_path, learn, easy):
    train_file, dev_file = easy
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_time="1h"), base=learn)
    assert r.steps == 12 and not r.out_of_time
    assert load_prompt(r.path, learn).meta.training["stopped_by"] is None


def test_resume_after_the_budget_ends_where_an_uninterrupted_run_ends(tmp_path, learn, easy):
    train_file, dev_file = easy
    full = train(cfg(tmp_path / "full", train_file, eval=str(dev_file), checkpoint_every=1), base=learn)
    cut_cfg = dict(eval=str(dev_file), checkpoint_every=1)
    cut = train(cfg(tmp_path / "cut", train_file, max_time=1e-6, **cut_cfg), base=learn)
    assert cut.steps == 1
    again = train(cfg(tmp_path / "cut", train_file, max_time=1e-6, resume=True, **cut_cfg), base=learn)
    assert again.steps == 1 and again.out_of_time  # the budget is spent: nothing more is trained
    done = train(cfg(tmp_path / "cut", train_file, max_time="1h", resume=True, **cut_cfg), base=learn)
    assert done.steps == 12 and not done.out_of_time
    a = load_checkpoint(full.run_dir / "checkpoint.safetensors").prompts
    b = load_checkpoint(done.run_dir / "checkpoint.safetensors").prompts
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cli_flags(tmp_path, easy):
    from softprompt.cli import build_parser
    from softprompt.commands.train import config_from_args

    train_file, _ = easy
    args = build_parser().parse_args(["train", "--data", str(train_file), "--out", str(tmp_path / "p.safetensors"),
                                      "--max-steps", "auto", "--max-time", "90s"])
    c = config_from_args(args)
    assert c.max_steps == "auto" and c.max_time == 90.0


# --max-steps auto: the plan comes from a step measured on this machine (train/plan.py)

def _fake_step(monkeypatch, seconds: float, eval_seconds: float = 1.5) -> list[int]:
    """Make the probe report ``seconds`` a step and ``eval_seconds`` a dev evaluation; returns a list
    counting the probes."""
    from softprompt.train import plan

    calls: list[int] = []

    def measure(run, backward):
        calls.append(1)
        return seconds, 0.0

    monkeypatch.setattr(plan, "measure_step", measure)
    monkeypatch.setattr(plan, "measure_eval", lambda run: eval_seconds)
    return calls


def test_auto_plan_probe_leaves_training_as_the_same_fixed_plan_would(tmp_path, learn, easy):
    """The probe (forward and backward of the first batches, no optimizer step) changes nothing: a
    plan capped by the data (10 passes over 48 rows) trains exactly the fixed run of that length."""
    train_file, dev_file = easy
    auto = train(cfg(tmp_path / "auto", train_file, eval=str(dev_file), max_steps="auto", max_time="1h"), base=learn)
    assert auto.steps == 60 and load_prompt(auto.path, learn).meta.training["planned_steps"] == 60
    fixed = train(cfg(tmp_path / "fixed", train_file, eval=str(dev_file), max_steps=60), base=learn)
    assert torch.equal(load_prompt(auto.path, learn).tensor, load_prompt(fixed.path, learn).tensor)


def test_auto_plan_fits_steps_and_dev_evaluations_into_the_budget(tmp_path, learn, easy, monkeypatch):
    from softprompt.train.budget import PLAN_MARGIN, plan_steps

    _fake_step(monkeypatch, 2.0, 6.0)  # a slow machine: 2 s a step, 6 s to evaluate the 12 dev rows
    train_file, dev_file = easy
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_steps="auto", max_time=100, eval_every=None),
              base=learn)
    steps, every = plan_steps(PLAN_MARGIN * 100, 2.0, 6.0, 48, 8, None)
    assert steps < 60  # the budget, not the data, limits this plan
    # the run itself is far faster than probed: at its first evaluation it re-fits to the data's cap, once
    refits = [(h["step"], h["refit"]["planned_steps"], h["refit"]["steps"]) for h in r.history if "refit" in h]
    assert refits == [(every, steps, 60)]
    assert r.steps == 60 and load_prompt(r.path, learn).meta.training["planned_steps"] == 60
    assert [h["step"] for h in r.history if "eval" in h] == [s for s in range(1, 61) if s % every == 0 or s == 60]


def test_refit_steps_fits_the_time_left_at_the_runs_own_pace():
    from softprompt.train.budget import PLAN_MARGIN, refit_steps

    # 10 done; 100 s left (95 usable) at 1 s a step and 5 s an evaluation every 10 steps: 80 + 8 x 5 = 120 > 95,
    # 72 steps + 8 evaluations = 112 > 95, ... 63 steps + 7 evaluations = 98 > 95, 60 + 6 x 5 = 90 fits; 61..: 61+35 > 95
    assert PLAN_MARGIN == 0.95
    assert refit_steps(10, 100.0, 1.0, 5.0, 10, 1000) == 10 + 60
    assert refit_steps(10, 100.0, 1.0, 0.0, 10, 1000) == 10 + 95  # no dev data: steps alone
    assert refit_steps(10, 100.0, 1.0, 5.0, 10, 40) == 40  # the data's cap
    assert refit_steps(10, 100.0, 10.0, 5.0, 10, 1000) == 10 + 9  # slower than planned: shorter (90 + 5 fits)
    assert refit_steps(10, 0.5, 1.0, 5.0, 10, 1000) == 10  # no time left: the run ends where it is


def test_a_probed_step_is_scaled_to_a_typical_batch_by_its_padded_tokens():
    from softprompt.train.plan import padded_tokens

    assert padded_tokens([0, 1], [5, 9, 40]) == 18 and padded_tokens([0, 1], [5, 9, 40], extra=20) == 58
    assert padded_tokens([2], [5, 9, 40], extra=20) == 60


def test_the_probe_times_a_dev_batch_and_scales_it_to_the_dev_set(tmp_path, learn, easy, monkeypatch):
    """measure_eval evaluates a batch of dev rows untimed, times the next and scales it to the 12 rows;
    a dev set of two batches or less is timed whole."""
    from softprompt.train import plan
    from softprompt.train.loop import probe_step

    seen = []
    real = plan.evaluate_prompt
    monkeypatch.setattr(plan, "evaluate_prompt",
                        lambda pm, p, spec, rows, bs, **kw: seen.append(len(rows)) or real(pm, p, spec, rows, bs, **kw))
    train_file, dev_file = easy
    step_s, eval_s, setup_s = probe_step(cfg(tmp_path, train_file, eval=str(dev_file), eval_batch_size=4), base=learn)
    assert seen == [4, 4] and step_s > 0 and eval_s > 0 and setup_s > 0
    seen.clear()
    probe_step(cfg(tmp_path, train_file, eval=str(dev_file), eval_batch_size=6), base=learn)
    assert seen == [12]
    assert probe_step(cfg(tmp_path, train_file), base=learn)[1] == 0.0  # no dev data: no evaluation
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.jsonl"))  # a probe writes nothing


def test_auto_plan_is_kept_in_the_checkpoint_and_a_resumed_run_follows_it(tmp_path, learn, easy, monkeypatch):
    train_file, dev_file = easy
    kw = dict(eval=str(dev_file), max_steps="auto", max_time=100, checkpoint_every=1)
    _fake_step(monkeypatch, 2.0)
    full = train(cfg(tmp_path / "full", train_file, **kw), base=learn)
    # stops at its second evaluation, after the plan was re-fitted at its first
    halted = train(cfg(tmp_path / "cut", train_file, **kw), base=learn, on_eval=lambda dev: dev.step > 4)
    assert halted.steps == 8 < full.steps
    probes = _fake_step(monkeypatch, 0.5)  # the machine got faster: a new plan would be longer
    done = train(cfg(tmp_path / "cut", train_file, resume=True, **kw), base=learn)
    assert probes == [] and done.steps == full.steps  # no new measure; the checkpoint's plan
    a = load_checkpoint(full.run_dir / "checkpoint.safetensors").prompts
    b = load_checkpoint(done.run_dir / "checkpoint.safetensors").prompts
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_after_an_evaluation_a_step_that_would_end_past_the_budget_is_not_taken():
    from types import SimpleNamespace

    from softprompt.distributed import LocalRuntime
    from softprompt.train.plan import no_time_for_a_step as _no_time_for_a_step

    run = SimpleNamespace(config=SimpleNamespace(max_time=10.0), rt=LocalRuntime())
    assert not _no_time_for_a_step(run, SimpleNamespace(elapsed=9.0, train_time=2.0, step=4))  # 9 + 0.5 fits
    assert _no_time_for_a_step(run, SimpleNamespace(elapsed=9.6, train_time=2.0, step=4))  # 9.6 + 0.5 does not
    run.config.max_time = None
    assert not _no_time_for_a_step(run, SimpleNamespace(elapsed=99.0, train_time=2.0, step=4))


def test_a_run_that_stops_after_an_evaluation_is_not_evaluated_again(tmp_path, learn, easy, monkeypatch):
    from softprompt.train import loop

    monkeypatch.setattr(loop, "no_time_for_a_step", lambda run, state: state.step == 4)
    train_file, dev_file = easy
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_time="1h"), base=learn)
    assert r.steps == 4 and r.out_of_time
    assert [h["step"] for h in r.history if "eval" in h] == [4]  # not a 5th step and a second evaluation


@pytest.mark.parametrize("record, refit_at", [({"refit": False}, 5), ({"refit": True}, None), ({}, None)])
def test_a_resumed_run_refits_only_if_its_checkpoint_was_not_refitted_yet(record, refit_at):
    """The checkpoint's plan says whether it was re-fitted; a checkpoint from before re-fits existed
    (no key) is taken as final, as those runs never re-fitted."""
    from types import SimpleNamespace

    from softprompt.train.plan import plan_auto

    config = SimpleNamespace(max_steps="auto", warmup=0.1, eval_every=None, checkpoint_every=None)
    run = SimpleNamespace(config=config, total=0, warm=0, eval_every=0, ckpt_every=0, refit_at=None, has_dev=True)
    saved = SimpleNamespace(info={"plan": {"planned_steps": 25, "eval_every": 5, "warmup_steps": 2, **record}})
    assert plan_auto(run, backward=None, saved=saved) == 0.0
    assert (run.total, run.eval_every, run.warm, run.refit_at) == (25, 5, 2, refit_at)


def test_a_plan_with_one_evaluation_refits_a_fifth_of_the_way_with_the_probed_evaluation(tmp_path, learn, easy,
                                                                                         monkeypatch):
    """A short plan's only dev evaluation is its last: the run re-fits at a fifth of its steps instead,
    counting the probe's evaluation time for the evaluations still to come."""
    from softprompt.train.budget import PLAN_MARGIN, plan_steps

    _fake_step(monkeypatch, 2.0, 30.0)  # an evaluation costs a quarter of the budget: one, at the end
    train_file, dev_file = easy
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_steps="auto", max_time=100, eval_every=None),
              base=learn)
    steps, every = plan_steps(PLAN_MARGIN * 100, 2.0, 30.0, 48, 8, None)
    assert every == steps  # one evaluation, at the end
    (refit,) = [h for h in r.history if "refit" in h]
    assert refit["step"] == steps // 5 and refit["refit"]["planned_steps"] == steps
    assert refit["refit"]["eval_s"] == 30.0 and refit["refit"]["steps"] == r.steps == 60  # the data's cap
    assert [h["step"] for h in r.history if "eval" in h] == [60]  # its one evaluation moved with its end
