"""The run's budget: ``--max-time`` durations, the ``--max-steps auto`` plan (pure functions), and
the checks of those flags (and ``--calibrate``) that TrainConfig runs on creation.

Not here: stopping the loop when the time is spent (loop.py), the learning-rate schedule (schedule.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..calibration import CALIBRATE_CHOICES
from ..errors import ConfigError


DURATION_UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0}
"""``--max-time`` suffixes: seconds, minutes, hours (no suffix: seconds)."""

AUTO_EPOCHS = 10
"""``--max-steps auto`` plans at most this many passes over the training data."""
AUTO_MIN_STEPS, AUTO_MAX_STEPS = 50, 5000
"""Bounds of the ``--max-steps auto`` plan."""
AUTO_STEP_SECONDS = 0.25
"""The fastest step ``--max-steps auto`` plans for (s; a 135M base in bf16 on a fast CPU core at batch
8 takes about 1 s): the plan never holds more steps than the budget could run at this speed."""


def parse_duration(value: float | int | str) -> float:
    """``--max-time``: seconds as a number, or "90", "90s", "15m", "1.5h" -> seconds (pure).

    Raises ValueError (one sentence) when the value is not a positive duration."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        scale = DURATION_UNITS.get(text[-1], None)
        try:
            seconds = float(text[:-1] if scale else text) * (scale or 1.0)
        except ValueError:
            raise ValueError(f"{value!r}: give seconds or a number with s, m or h (90s, 15m, 1h)") from None
    else:
        raise ValueError(f"{value!r}: give seconds or a number with s, m or h (90s, 15m, 1h)")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def auto_steps(n_examples: int, batch_size: int, max_time: float) -> int:
    """``--max-steps auto`` before a step is measured (pure): at most ``AUTO_EPOCHS`` passes over the
    data and what the budget could run at ``AUTO_STEP_SECONDS`` a step, within [AUTO_MIN_STEPS,
    AUTO_MAX_STEPS]. The run replaces it with a plan from a measured step (plan.py); it remains the
    plan of a run resumed from a checkpoint that kept none (written before plans were measured)."""
    by_data = AUTO_EPOCHS * max(1, n_examples // batch_size)
    by_time = int(max_time / AUTO_STEP_SECONDS)
    return max(AUTO_MIN_STEPS, min(AUTO_MAX_STEPS, by_data, by_time))


FORWARD_SHARE = 0.5
"""Where a dev evaluation is not measured (bench/quality.py's equal-time plans from step costs alone),
a dev row is taken to cost this fraction of a training row (measured 0.45-0.51: tweet-sentiment, 3
labels, 100 dev rows in 24-30 s where a step of 8 rows took 4.0-4.6 s; SmolLM2-135M fp32 on a loaded
AMD EPYC core, bench/results/tune_tweet_sentiment.json). Not for generation: a dev row there costs
several training rows (train/plan.py measures it)."""
TRAIN_EVALS = 5
"""Dev evaluations of a trial without --eval-every (as train's default: 5 a run) ..."""
EVAL_SHARE = 0.25
"""... fewer where they would take more than this fraction of its share (a 100-row dev evaluation
took as long as 6 training steps on a loaded CPU core, bench/results/tune_tweet_sentiment.json: 5 of
them would eat most of a short trial)."""


def step_cap(n_train: int, batch_size: int) -> int:
    """Most steps a plan holds (pure): ``AUTO_EPOCHS`` passes over ``n_train`` rows, at most ``AUTO_MAX_STEPS``."""
    return max(1, min(AUTO_MAX_STEPS, AUTO_EPOCHS * max(1, n_train // batch_size)))


def _steps_that_fit(seconds: float, step_s: float, eval_s: float, every: int, least: int, most: int) -> int:
    """The most steps n in [least, most] whose training (``step_s`` each) and dev evaluations (one every
    ``every`` steps and one at the end: ceil(n / every), ``eval_s`` each) fit ``seconds`` (pure); ``least``
    when none fits."""
    n = max(least, min(most, int(seconds / step_s) if step_s > 0 else most))
    while n > least and n * step_s + math.ceil(n / every) * eval_s > seconds:
        n -= 1
    return n


def plan_steps(share: float, step_s: float, eval_s: float, n_train: int, batch_size: int,
               eval_every: int | None) -> tuple[int, int]:
    """A run's (or a tune trial's) steps, the span of its learning-rate schedule, and its --eval-every, pure: the most
    steps whose training (``step_s`` a step) and dev evaluations (``eval_s`` each) fit its ``share`` of
    the budget (s), at most ``AUTO_EPOCHS`` passes over the data and ``AUTO_MAX_STEPS``, at least 1.
    Given no ``eval_every``, up to ``TRAIN_EVALS`` evaluations spread over the steps, fewer where
    they would take more than ``EVAL_SHARE`` of the share (at least one, at the end)."""
    cap = step_cap(n_train, batch_size)
    if eval_every:
        return _steps_that_fit(share, step_s, eval_s, eval_every, 1, cap), eval_every
    k = max(1, min(TRAIN_EVALS, int(EVAL_SHARE * share / eval_s))) if eval_s > 0 else TRAIN_EVALS
    n = max(1, min(cap, int((share - k * eval_s) / step_s)))
    k = min(k, n)
    return n, math.ceil(n / k)


PLAN_MARGIN = 0.95
"""``--max-steps auto`` plans for this fraction of the budget left: batches differ in length and machines in load."""


def dev_eval_seconds(n_dev: int, batch_size: int, step_s: float) -> float:
    """A dev evaluation's seconds before one has been measured (pure): ``n_dev`` rows at
    ``FORWARD_SHARE`` of a training row each, a training step of ``batch_size`` rows taking ``step_s``."""
    return n_dev / batch_size * step_s * FORWARD_SHARE


def auto_plan(seconds: float, step_s: float, eval_s: float, n_train: int, batch_size: int,
              eval_every: int | None) -> tuple[int, int]:
    """``--max-steps auto``'s (steps, eval_every) for ``seconds`` of budget left at ``step_s`` a step,
    ``eval_s`` a dev evaluation (0: none) and ``n_train`` training rows (pure): :func:`plan_steps` over
    ``PLAN_MARGIN`` of the time left, at least one step's worth."""
    return plan_steps(max(PLAN_MARGIN * seconds, step_s), step_s, eval_s, n_train, batch_size, eval_every)


def refit_steps(done: int, left_s: float, step_s: float, eval_s: float, every: int, cap: int) -> int:
    """A planned run's new length at its first dev-evaluation point (pure): ``done`` steps plus the most
    whose training (``step_s`` a step, the run's own mean so far) and dev evaluations (one every
    ``every`` steps and at the end, ``eval_s`` each, the one just timed) fit ``PLAN_MARGIN`` of the
    ``left_s`` seconds left, at most ``cap`` steps in all (:func:`step_cap`)."""
    return done + _steps_that_fit(PLAN_MARGIN * left_s, step_s, eval_s, every, 0, max(0, cap - done))


def check_budget(c) -> None:
    """--max-time (a duration, made seconds), --max-steps (a count, or auto with --max-time), --calibrate."""
    if c.max_time is not None:
        try:
            c.max_time = parse_duration(c.max_time)
        except ValueError as e:
            raise ConfigError(f"--max-time {e}") from None
    if c.max_steps == "auto" and c.max_time is None:
        raise ConfigError("--max-steps auto needs --max-time")
    if not (c.max_steps in (None, "auto") or isinstance(c.max_steps, int) and c.max_steps >= 1):
        raise ConfigError(f"--max-steps must be at least 1 or auto, got {c.max_steps}")
    if c.planned is not None:  # set by a caller (tune), not a flag: still checked before a step runs
        if c.max_steps != "auto":
            raise ConfigError(f"planned {c.planned} needs max_steps='auto', got {c.max_steps!r}")
        if not (len(c.planned) == 3 and all(isinstance(v, int) for v in c.planned[:2])
                and c.planned[0] >= 1 and c.planned[1] >= 1 and c.planned[2] >= 0):
            raise ConfigError(f"planned must be (steps >= 1, eval_every >= 1, eval seconds >= 0), got {c.planned}")
    if c.init_from is not None and not Path(c.init_from).is_file():
        raise ConfigError(f"--init-from: no such prompt file {c.init_from}")
    if c.calibrate not in CALIBRATE_CHOICES:
        raise ConfigError(f"--calibrate {c.calibrate!r}: choose one of {', '.join(CALIBRATE_CHOICES)}")
