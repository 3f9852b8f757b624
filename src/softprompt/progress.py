"""Progress bars for long runs: scoring, baselines, prediction, conversions (tqdm, on stderr).

The library is silent by default; a command turns bars on for its duration with :func:`shown`
(off under ``--quiet`` and on every process but the main one), and names what is running with
:func:`stage`, so that deep loops (scoring a batch, generating) need no extra arguments::

    with progress.shown(not quiet), progress.stage("baseline few-shot"):
        evaluate_prompt(...)      # draws "baseline few-shot:  40%|####  | 240/600 [01:10<01:45, 3.4ex/s]"

Not here: the training loop's own step bar (train/loop.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Iterator

__all__ = ["shown", "stage", "bar", "enabled"]

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("softprompt_progress", default=False)
_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("softprompt_progress_stage", default="")


def enabled() -> bool:
    """Whether bars are drawn here and now."""
    return _ENABLED.get()


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Draw progress bars (``on``) or not, for the duration."""
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the work that bars drawn inside report (e.g. "soft prompt", "baseline few-shot")."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


DELAY_S = 2.0
"""A bar appears only once its work has run this long: quick runs (and one-line errors) stay clean."""


def bar(total: int | None, desc: str | None = None, unit: str = "ex", leave: bool = True):
    """A tqdm bar with counts, rate and ETA on stderr; a no-op bar when progress is off.

    ``desc`` defaults to the current :func:`stage`.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or _STAGE.get() or None, unit=unit, leave=leave, disable=not _ENABLED.get(),
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0, delay=DELAY_S)
