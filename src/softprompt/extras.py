"""Optional parts of softprompt: which extra brings which modules, and the one-line error when a
command needs one that is missing (never an ImportError traceback).

Not here: the extras' package lists (pyproject.toml) and the trackers' own table (train/tracking.py).
"""

from __future__ import annotations

import importlib.util

from .errors import ConfigError, SoftpromptError

EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "peft": ("peft",),
    "distributed": ("accelerate",),
    "deepspeed": ("deepspeed", "accelerate"),
    "eval": ("matplotlib",),
    "parquet": ("pyarrow",),
    "datasets": ("datasets", "pyarrow"),
    "tune": ("optuna",),
}
"""Extra -> the modules it installs that softprompt imports."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, error: type[SoftpromptError] = ConfigError) -> None:
    """Raise ``error`` (one line) naming the extra to install when one of its modules is missing.

    Args:
        extra: a key of :data:`EXTRAS`.
        what: what needs it, as the message's subject (e.g. ``"softprompt serve"``).
    """
    gone = missing(extra)
    if gone:
        raise error(f"{what} needs the '{extra}' extra ({', '.join(gone)} not installed): "
                    f"pip install 'softprompt[{extra}]'")
