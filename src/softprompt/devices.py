"""``--device``: where a command runs the model, one rule for every command.

``auto`` (or None) is the first CUDA device when one is present, else the CPU; ``cpu``, ``cuda``
and ``cuda:N`` are checked before any model loads, so a wrong value is one line.
"""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(name: str | None) -> torch.device:
    """The torch device for ``--device name``; raises ConfigError naming the problem."""
    name = (name or "auto").strip()
    if not _PATTERN.match(name):
        raise ConfigError(f"--device {name!r}: choose {DEVICE_HELP}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev
