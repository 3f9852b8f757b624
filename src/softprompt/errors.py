"""User-facing errors: one sentence that names the problem (and the file/line where there is one).

The CLI prints ``str(err)`` of any :class:`SoftpromptError` on one line and exits 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class SoftpromptError(Exception):
    """Base class of every error caused by user input (files, flags, requests)."""


class ConfigError(SoftpromptError, ValueError):
    """A configuration value (CLI flag, config field) is invalid."""


class PromptFileError(SoftpromptError):
    """A prompt file is missing, corrupt, of an unknown version, or for another base model."""


class ModelLoadError(SoftpromptError):
    """A base model could not be located or loaded."""


class DataError(SoftpromptError, ValueError):
    """A data file, template or label set is invalid."""


def check_at_least(flag: str, value: float | None, minimum: float) -> None:
    """Raise :class:`ConfigError` naming ``flag`` if ``value`` (None: not given) is below ``minimum``."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


def check_choice(flag: str, value: object, choices: tuple | list) -> None:
    """Raise :class:`ConfigError` naming ``flag`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
