"""``--max-steps auto``: the run's length planned from a training step measured on this machine.

A fixed guess of a step's cost is wrong by 10x between a GPU and a loaded CPU core, and a plan too
long for its budget ends in its warmup with no dev evaluation before the end. So before the loop,
the first ``PROBE_STEPS`` batches run forward and backward without an optimizer step (the prompts,
optimizer and data order stay as they were), the later ones timed; then :func:`plan_steps` fits the
steps and dev evaluations into what is left of ``--max-time``. The plan is kept in the checkpoint,
so a resumed run follows the same schedule (bit-exact) without measuring again.

Not here: the plan's arithmetic (budget.plan_steps, pure), the loop that stops at the budget (loop.py).
"""

from __future__ import annotations

import time
from typing import Callable

from .budget import auto_plan
from .schedule import SAMPLINGS, warmup_steps
from .setup import Run

PROBE_STEPS = 3
"""Steps run before the plan: the first pays one-time costs (allocation, kernel choice), the rest are timed."""


def measure_step(run: Run, backward: Callable[[Run, list[int]], object]) -> tuple[float, float]:
    """(seconds of one training step, seconds the probe took): the mean of the timed probes. Only
    gradients are computed, and dropped; the main process's measure holds for every process."""
    config, times = run.config, []
    t0 = time.perf_counter()
    for step in range(PROBE_STEPS):
        batch = SAMPLINGS[config.sampling](step, run.lengths, run.row_keys, config.batch_size, config.seed,
                                           run.order_cache)
        t = time.perf_counter()
        backward(run, batch)
        run.opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = sum(times[1:]) / max(1, len(times) - 1)
    return float(run.rt.broadcast(step_s if run.rt.is_main else None)), time.perf_counter() - t0


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
        return 0.0
    step_s, probe_s = measure_step(run, backward)
    n_dev = sum(len(t.dev or []) for t in run.tasks)
    total, every = auto_plan(config.max_time - probe_s, step_s, n_dev, len(run.rows), config.batch_size,
                             config.eval_every)
    _apply(run, total, every)
    run.plan_note = (f"--max-steps auto: {total} steps planned from a measured step of {step_s:.3g}s"
                     + (f" and {n_dev} dev rows every {every} steps" if run.has_dev else ""))
    return probe_s


def plan_record(run: Run) -> dict | None:
    """What a checkpoint keeps of the plan (None: the run has a fixed step count)."""
    if run.config.max_steps != "auto":
        return None
    return {"planned_steps": run.total, "eval_every": run.eval_every}


def _apply(run: Run, total: int, every: int) -> None:
    config = run.config
    run.total = total
    run.warm = warmup_steps(config.warmup, total)
    run.eval_every = config.eval_every or every
    if config.checkpoint_every is None:
        run.ckpt_every = max(1, total // 10)
