"""``--max-steps auto``: the run's length planned from a training step and a dev evaluation measured
on this machine.

A fixed guess of a step's cost is wrong by 10x between a GPU and a loaded CPU core, and a plan too
long for its budget ends in its warmup with no dev evaluation before the end. So before the loop,
the first ``PROBE_STEPS`` batches run forward and backward without an optimizer step (the prompts,
optimizer and data order stay as they were), the later ones timed, and one batch of each task's dev
rows is evaluated and timed (a generation task's dev evaluation costs several times a classification
one's per row: a fixed share of a training row was wrong by 2x there); then :func:`plan_steps` fits
the steps and dev evaluations into what is left of ``--max-time``.

A probe of two steps reads the machine's load of those seconds: next to another job it read 0.95-1.2 s
a step where the run then took 0.76 s (Intel Xeon, bf16, bench/results/tune_equal_time_*_xeon_amx),
and the run ended with a fifth of its budget unused. So at its first dev-evaluation point (a fifth of
the way in when that evaluation is its last) the run re-fits its length to its own pace
(:func:`refit`: its mean step so far and the evaluation just timed), longer or shorter, once. The
plan and whether it was re-fitted are kept in the checkpoint, so a resumed run follows the same
schedule without measuring again.

The loop's two budget checks live here too (:func:`out_of_time`, :func:`no_time_for_a_step`), beside
the plan they keep to.

Not here: the plan's arithmetic (budget.plan_steps / refit_steps, pure), the loop that calls them
(loop.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .. import progress
from ..evaluate import evaluate_prompt
from ..precision import autocast
from ..trainable import collapse, prompt_length
from .budget import auto_plan, refit_steps, step_cap
from .schedule import SAMPLINGS, warmup_steps
from .setup import Run

PROBE_STEPS = 3
"""Steps run before the plan: the first pays one-time costs (allocation, kernel choice), the rest are timed."""


TYPICAL_STEPS = 256
"""Batches whose padded size stands for a typical step (the first this many of the run's order)."""


def measure_step(run: Run, backward: Callable[[Run, list[int]], object]) -> tuple[float, float]:
    """(seconds of one training step, seconds the probe took). Batches are grouped by length, so the
    few probed can be much shorter or longer than most: their time per padded token is scaled to the
    mean padded size of the run's first ``TYPICAL_STEPS`` batches (:func:`padded_tokens`). Only
    gradients are computed, and dropped; the main process's measure holds for every process."""
    times, sizes = [], []
    extra = max(prompt_length(p()) for p in run.params)  # virtual tokens: every row computes them too
    t0 = time.perf_counter()
    for step in range(PROBE_STEPS):
        batch = _batch(run, step)
        t = time.perf_counter()
        backward(run, batch)
        run.opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        sizes.append(padded_tokens(batch, run.lengths, extra))
    typical = sum(padded_tokens(_batch(run, k), run.lengths, extra) for k in range(TYPICAL_STEPS)) / TYPICAL_STEPS
    step_s = sum(times[1:]) / max(1, sum(sizes[1:])) * typical
    return float(run.rt.broadcast(step_s if run.rt.is_main else None)), time.perf_counter() - t0


def padded_tokens(batch: list[int], lengths: list[int], extra: int = 0) -> int:
    """Tokens a batch computes once padded to its longest row, each row ``extra`` more (the prompt's) (pure)."""
    return len(batch) * (max(lengths[i] for i in batch) + extra)


def _batch(run: Run, step: int) -> list[int]:
    config = run.config
    return SAMPLINGS[config.sampling](step, run.lengths, run.row_keys, config.batch_size, config.seed, run.order_cache)


def measure_eval(run: Run) -> float:
    """Seconds of one dev evaluation of every task (0: no dev data): a batch of each task's dev rows
    evaluated with its prompt as it is now, timed, and scaled to all of its dev rows; the batch before
    it is evaluated untimed (the first pays one-time costs that a 12x scale-up would multiply), unless
    the dev set is only two batches or less: then all of it is timed. Nothing is kept."""
    bs, m, total = run.config.eval_batch_size, run.model, 0.0
    for t, p in zip(run.tasks, run.params):
        if not t.dev:
            continue
        warm, rows = (t.dev[:bs], t.dev[bs:2 * bs]) if len(t.dev) > 2 * bs else ([], t.dev)
        prompt = collapse(p).detach()
        with torch.no_grad(), autocast(m.device, m.amp), progress.shown(False):  # no bars for a probe
            if warm:
                evaluate_prompt(m.pm, prompt, t.spec, warm, bs)
            start = time.perf_counter()
            evaluate_prompt(m.pm, prompt, t.spec, rows, bs)
        total += (time.perf_counter() - start) * len(t.dev) / len(rows)
    return float(run.rt.broadcast(total if run.rt.is_main else None))


def plan_auto(run: Run, backward: Callable[[Run, list[int]], object], saved=None) -> float:
    """Set ``run.total`` (and the warmup, dev-evaluation and checkpoint intervals that follow from
    it) for ``--max-steps auto``; returns the seconds spent measuring (0 when nothing was measured).

    A resumed run takes the plan its checkpoint holds (a checkpoint from before plans were kept:
    the plan it was made with, already in ``run.total``). Runs with a step count are left alone."""
    config = run.config
    if config.max_steps != "auto":
        return 0.0
    if saved is not None:
        plan = saved.info.get("plan")
        if plan:
            _apply(run, int(plan["planned_steps"]), int(plan["eval_every"]))
            run.warm = int(plan.get("warmup_steps", run.warm))  # a re-fitted plan keeps its first warmup
            run.eval_estimate = float(plan.get("eval_s", 0.0))
            run.refit_at = None if plan.get("refit", True) else _refit_point(run)  # older checkpoints: never re-fitted
        return 0.0
    if config.planned is not None:  # planned by the caller (tune), from its own measurements
        steps, every, run.eval_estimate = config.planned
        _apply(run, steps, every)
        run.refit_at = _refit_point(run)
        return 0.0
    t0 = time.perf_counter()
    step_s, _ = measure_step(run, backward)
    eval_s = measure_eval(run)
    probe_s = time.perf_counter() - t0
    n_dev = sum(len(t.dev or []) for t in run.tasks)
    total, every = auto_plan(config.max_time - probe_s, step_s, eval_s, len(run.rows), config.batch_size,
                             config.eval_every)
    _apply(run, total, every)
    run.eval_estimate, run.refit_at = eval_s, _refit_point(run)
    run.plan_note = (f"--max-steps auto: {total} steps planned from a measured step of {step_s:.3g}s"
                     + (f" and a measured evaluation of {n_dev} dev rows of {eval_s:.3g}s, every {every} steps"
                        if run.has_dev else ""))
    return probe_s


def _one_evaluation(run: Run) -> bool:
    """The plan evaluates once, at its end (a short plan): that evaluation moves with the end."""
    return run.eval_every >= run.total


def _refit_point(run: Run) -> int:
    """Where a planned run re-fits: its first dev evaluation, unless that is its last (a short plan):
    then a fifth of the way, with the probe's evaluation time."""
    return run.eval_every if run.has_dev and not _one_evaluation(run) else max(1, run.total // 5)


def refit(run: Run, state, eval_s: float) -> str | None:
    """Re-fit a planned run's length at ``run.refit_at`` (:func:`_refit_point`) to what is left of
    ``--max-time`` at its own mean step so far and ``eval_s`` a dev evaluation (the one just timed,
    else the probe's; 0 without dev data): longer when the probe read the machine slower than it ran,
    shorter when faster. The warmup stays as planned. Kept in metrics.jsonl; the main process decides for
    every process. Returns what to say (None: the plan stands)."""
    config, done = run.config, state.step
    step_s, cap = state.train_time / max(1, done), step_cap(len(run.rows), config.batch_size)
    single = _one_evaluation(run)
    total = refit_steps(done, config.max_time - state.elapsed, step_s, eval_s,
                        cap if single else run.eval_every, cap)
    total = int(run.rt.broadcast(total if run.rt.is_main else None))
    run.refit_at = None
    if total == run.total:
        return None
    if single:
        run.eval_every = total
    run.log.append({"step": done, "refit": {"planned_steps": run.total, "steps": total,
                                            "step_s": round(step_s, 4), "eval_s": round(eval_s, 3)}})
    planned, run.total = run.total, total
    return (f"--max-steps auto: {total} steps re-fitted to this run's pace ({step_s:.3g}s a step, "
            f"{eval_s:.3g}s an evaluation; {planned} planned)")


def out_of_time(run: Run, state) -> bool:
    """The --max-time budget is spent (the main process's clock decides for every process)."""
    if run.config.max_time is None:
        return False
    return bool(run.rt.broadcast(state.elapsed >= run.config.max_time if run.rt.is_main else None))


def no_time_for_a_step(run: Run, state) -> bool:
    """One more step (at the mean step time so far) would end past --max-time: after an evaluation, stop."""
    if run.config.max_time is None or not state.step:
        return False
    step_s = state.train_time / state.step
    return bool(run.rt.broadcast(state.elapsed + step_s > run.config.max_time if run.rt.is_main else None))


def plan_record(run: Run) -> dict | None:
    """What a checkpoint keeps of the plan (None: the run has a fixed step count)."""
    if run.config.max_steps != "auto":
        return None
    return {"planned_steps": run.total, "eval_every": run.eval_every, "warmup_steps": run.warm,
            "eval_s": run.eval_estimate, "refit": run.refit_at is None}


def _apply(run: Run, total: int, every: int) -> None:
    config = run.config
    run.total = total
    run.warm = warmup_steps(config.warmup, total)
    run.eval_every = config.eval_every or every
    if config.checkpoint_every is None:
        run.ckpt_every = max(1, total // 10)
