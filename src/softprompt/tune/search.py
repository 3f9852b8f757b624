"""``tune()``: an Optuna study over prompt recipes within a wall-clock budget, on one task's dev data.

Read top to bottom: check the data and load the base once -> a study (TPE sampler seeded by --seed,
the chosen pruner; the known-good recipe of each method queued first) -> a training step measured on
this machine -> trials, each one :func:`softprompt.train.train` run with its share of the time left
(never planned shorter than --min-trial-steps while the budget has room: fewer, longer trials),
reporting every dev evaluation to the pruner -> the best trial's prompt written to --out with the
search in its metadata.

Study storage is Optuna's in-memory one: a search is not resumable (a trial is minutes; its record,
prompt and metrics stay in the run folder either way).

Not here: the search space and settings (config.py), the records (trials.py), training (train/).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

from .. import devices
from ..artifact import load_prompt, save_prompt
from ..base import BaseModel, load_base_model
from ..extras import require
from ..train import train
from ..train.balance import resolve as resolve_balance
from ..train.budget import AUTO_EPOCHS, plan_steps
from ..train.loop import probe_step
from ..train.prepare import prepare, total_steps
from ..train.records import DevResult
from ..train.summary import TrainingSummary
from ..tasks import task as task_kind
from .config import PRUNERS, SEARCH_METHODS, TuneConfig
from .trials import TrialLog, TrialRecord, TuneResult, best_trial

__all__ = ["tune"]



def tune(config: TuneConfig, base: BaseModel | None = None, pruner=None) -> TuneResult:
    """Search recipes for one task within ``config.budget``; write the best trial's prompt to ``config.train.out``.

    Args:
        config: the search (validated on creation).
        base: an already-loaded base model (default: load ``config.train.model``), shared by every trial.
        pruner: an Optuna pruner instead of ``config.pruner``'s (Python API, tests).
    Returns:
        :class:`~.trials.TuneResult`: the winner's file, every trial, what stopped the search.
    Raises:
        ConfigError / DataError on bad settings or data, before any model loads.
    """
    require("tune", "softprompt tune")
    t0 = time.perf_counter()
    tc = config.train
    task = prepare(tc)[0]  # bad data fails before the model loads
    balance = resolve_balance(tc, [task])[0]
    metric, direction = balance.select_metric, balance.direction
    if base is None:
        _say(tc.quiet, f"loading {tc.model or 'the default model'} ...")
        base = load_base_model(tc.model, dtype=tc.dtype, device=None if tc.device_map else devices.resolve_device(tc.device),
                               device_map=tc.device_map, quantization=tc.quantize)
    study = _study(config, direction, pruner)
    log = TrialLog(config.run_path() / "trials.jsonl")
    _say(tc.quiet, f"searching {', '.join(config.methods)} for {config.budget:g}s, at most {config.trials} trials, "
                   f"by dev {metric} ({len(task.train)} train / {len(task.dev)} dev examples)")
    records: list[TrialRecord] = []
    try:
        stopped_by = _run_trials(config, study, len(task.train), base, metric, t0, log, records)
    except KeyboardInterrupt:  # Ctrl-C: the finished trials' best is still written, then the interrupt goes on
        if not records:
            raise
        stopped_by = "interrupted"
    best = best_trial(records, direction)
    seconds = time.perf_counter() - t0
    search = _summary(config, records, best, metric, seconds, stopped_by, log.path)
    path = _write_winner(config, best, search)
    _say(tc.quiet, f"best: trial {best.number} ({_recipe(best.params)}), dev {metric} {best.value:.4f}; "
                   f"{len(records)} trials in {seconds:.0f}s (stopped by {stopped_by}); saved {path}; trials in {log.path}")
    if stopped_by == "interrupted":
        raise KeyboardInterrupt
    return TuneResult(path=path, run_dir=config.run_path(), best=best, trials=records, seconds=seconds,
                      stopped_by=stopped_by, search=search)


def _study(config: TuneConfig, direction: int, pruner):
    """The Optuna study: TPE seeded by --seed, the pruner, each method's known-good recipe queued first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if direction > 0 else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=config.train.seed, n_startup_trials=_startup(config)),
                                pruner=pruner or PRUNERS[config.pruner]())
    for m in config.methods:
        study.enqueue_trial({"method": m, f"lr.{m}": SEARCH_METHODS[m].first_lr}
                            | ({"prompt_length": _first_length(config)} if len(config.prompt_lengths) > 1 else {}))
    return study


def _run_trials(config: TuneConfig, study, n_train: int, base, metric: str, t0: float, log: TrialLog,
                records: list[TrialRecord]) -> str:
    """Trials until --trials ran ("trials") or the budget is spent ("budget"); each finished trial is
    told to the study, appended to ``records`` and to trials.jsonl.

    The time left is shared equally between the trials not yet run, but between no more than it holds
    trials of ``--min-trial-steps`` (one dev evaluation each) at the step and evaluation times measured
    so far: a step probed before the first trial, then each trial's own. The first trial always runs;
    a later one starts only while a minimal trial of the slowest method measured still fits."""
    from optuna.trial import TrialState

    tc = config.train
    min_steps = _min_trial_steps(config, n_train)
    calibrates = tc.calibrate == "auto" and task_kind(tc.task).labelled  # one more dev pass after a trial's loop
    step_s: dict[str, float] = {}  # method -> measured seconds of a training step
    eval_s: dict[str, float] = {}  # method -> measured seconds of a dev evaluation
    setup = 0.0  # most seconds a trial spent outside its loop (reading data, calibrating, writing): not in --max-time
    for number in range(config.trials):
        left = config.budget - (time.perf_counter() - t0)
        if number and left < min_trial_seconds(min_steps, max(step_s.values()), max(eval_s.values())) + setup:
            return "budget"  # not even a minimal trial of the slowest method measured fits: stop
        trial = study.ask()
        params = _suggest(trial, config)
        if not step_s:  # before the first trial: a step measured on this machine, on this data
            probe = config.trial_config(number, params["method"], params["lr"], params["prompt_length"], config.budget, 1)
            step_s[params["method"]], eval_s[params["method"]], setup = probe_step(probe, base)
            setup += eval_s[params["method"]] if calibrates else 0.0  # its calibration's dev pass
            _say(tc.quiet, f"measured here: a step {step_s[params['method']]:.3g}s, a dev evaluation "
                           f"{eval_s[params['method']]:.3g}s; a trial of at least {min_steps} steps")
            left = config.budget - (time.perf_counter() - t0)
        step = step_s.get(params["method"]) or max(step_s.values())
        dev = eval_s.get(params["method"]) or max(eval_s.values())
        n = trials_that_fit(left, config.trials - number, min_trial_seconds(min_steps, step, dev) + setup)
        share = max(left / n - setup, 1e-3)
        plan, every = plan_steps(share, step, dev, n_train, tc.batch_size, tc.eval_every)
        rec = _run_trial(config, trial, number, params, share, (plan, every, dev), base, metric)
        done = rec.state == "complete"
        study.tell(trial, rec.value if done else None, state=TrialState.COMPLETE if done else TrialState.PRUNED)
        step_s[params["method"]], eval_s[params["method"]] = rec.step_seconds, rec.eval_seconds
        setup = max(setup, rec.seconds - rec.loop_seconds)
        records.append(rec)
        log.append(rec)
    return "trials"


def min_trial_seconds(steps: int, step_s: float, eval_s: float) -> float:
    """The time of the shortest trial worth running: ``steps`` training steps and one dev evaluation (pure)."""
    return steps * step_s + eval_s


def trials_that_fit(left: float, trials_left: int, min_trial_s: float) -> int:
    """How many trials to share the time ``left`` between (pure): the trials not yet run, but no more
    than the time holds trials of ``min_trial_s``; at least one (the time is given to it whole)."""
    return max(1, min(trials_left, math.floor(left / min_trial_s) if min_trial_s > 0 else trials_left))


def _min_trial_steps(config: TuneConfig, n_train: int) -> int:
    """Steps of the shortest trial: the user's fixed length (--max-steps / --epochs), else
    --min-trial-steps, at most the 10 passes over the data a plan allows."""
    tc = config.train
    if tc.max_steps is not None or tc.epochs is not None:
        return total_steps(tc, n_train)
    return min(config.min_trial_steps, AUTO_EPOCHS * max(1, n_train // tc.batch_size))


def _startup(config: TuneConfig) -> int:
    """Trials the TPE sampler draws at random before it models the results: the queued known-good
    recipes plus one, or half the trials, at most 10 (Optuna's default)."""
    return min(10, max(len(config.methods) + 1, config.trials // 2))


def _first_length(config: TuneConfig) -> int:
    lengths = config.prompt_lengths
    return config.train.prompt_length if config.train.prompt_length in lengths else lengths[0]


def _suggest(trial, config: TuneConfig) -> dict:
    """The trial's recipe: method, then a learning rate from that method's own range (a parameter per
    method, so the sampler models each range apart), then the prompt length when there is a choice."""
    method = trial.suggest_categorical("method", config.methods)
    lo, hi = SEARCH_METHODS[method].lr_range
    lr = trial.suggest_float(f"lr.{method}", lo, hi, log=True)
    lengths = config.prompt_lengths
    length = trial.suggest_categorical("prompt_length", lengths) if len(lengths) > 1 else lengths[0]
    return {"method": method, "lr": lr, "prompt_length": int(length)}


def _run_trial(config: TuneConfig, trial, number: int, params: dict, share: float, plan: tuple[int, int, float],
               base, metric: str) -> TrialRecord:
    """Train one trial, reporting each dev evaluation to the pruner (its k-th is Optuna step k); ``plan``
    is tune's (steps, eval_every, seconds of a dev evaluation) for it, re-fitted by the trial itself."""
    evals: list[dict] = []
    pruned = False

    def on_eval(dev: DevResult) -> bool:
        nonlocal pruned
        value = dev.score(config.name)
        evals.append({"step": dev.step, "value": value})
        trial.report(value, len(evals))
        pruned = trial.should_prune()
        _say(config.train.quiet, f"  step {dev.step}: dev {metric} {value:.4f}{' -> pruned' if pruned else ''}")
        return pruned

    tc = config.trial_config(number, params["method"], params["lr"], params["prompt_length"], share, *plan)
    steps = tc.planned[0] if tc.planned else tc.max_steps or "epochs"
    _say(config.train.quiet, f"trial {number}: {_recipe(params)}, {share:.0f}s, {steps} steps planned, "
                             f"dev every {tc.eval_every}")
    t = time.perf_counter()
    result = train(tc, base=base, on_eval=on_eval)
    seconds = time.perf_counter() - t
    summary = TrainingSummary.from_meta(load_prompt(result.path).meta.training)
    train_s = result.examples / result.examples_per_s if result.examples_per_s else 0.0  # the steps alone
    rec = TrialRecord(number=number, state="pruned" if pruned else "complete", params=params, metric=metric,
                      value=float(result.metrics[config.name][metric]), best_step=result.best_step[config.name],
                      evals=evals, steps=result.steps, planned_steps=summary.planned_steps, max_time=round(share, 3),
                      seconds=round(seconds, 3), loop_seconds=round(result.seconds, 3),
                      step_seconds=round(train_s / max(1, result.steps), 4),
                      eval_seconds=round((result.seconds - train_s) / max(1, len(evals)), 4), stopped_by=summary.stopped_by, prompt=str(result.path))
    _say(config.train.quiet, f"  best dev {metric} {rec.value:.4f} at step {rec.best_step} of {rec.steps}"
                             f"{' (pruned)' if pruned else ''}, {seconds:.0f}s")
    return rec


def _summary(config: TuneConfig, records: list[TrialRecord], best: TrialRecord, metric: str, seconds: float,
             stopped_by: str, trials_file) -> dict:
    """``training.search`` of the winner's prompt file."""
    return {"budget": config.budget, "seconds": round(seconds, 2), "stopped_by": stopped_by,
            "trials": len(records), "max_trials": config.trials,
            "completed": sum(r.state == "complete" for r in records), "pruned": sum(r.state == "pruned" for r in records),
            "metric": metric, "best_trial": best.number, "best_value": best.value, "best": best.params,
            "methods": list(config.methods), "prompt_lengths": list(config.prompt_lengths), "pruner": config.pruner,
            "sampler": "tpe", "seed": config.train.seed, "trials_file": str(trials_file)}


def _write_winner(config: TuneConfig, best: TrialRecord, search: dict):
    """The best trial's prompt (with its calibration, if fitted) to --out, atomically, the search
    recorded in its training metadata."""
    loaded = load_prompt(best.prompt)
    summary = TrainingSummary.from_meta(loaded.meta.training)
    summary.search = search
    meta = dataclasses.replace(loaded.meta, training=summary.to_meta())
    return save_prompt(config.train.out, loaded.tensor, meta, dtype=config.train.prompt_dtype)


def _recipe(params: dict) -> str:
    return f"{params['method']} lr {params['lr']:.3g} length {params['prompt_length']}"


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
