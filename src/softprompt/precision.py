"""Which numeric precision this machine really runs fast: ``--precision`` and the server's ``--dtype``.

On GPUs, bf16 (or fp16 where bf16 is missing) is always the fast choice. On CPUs it depends on
the instructions: bf16 matrix multiplies are native on x86 CPUs with AVX512-BF16 or AMX-BF16
(Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later) and on Arm CPUs with the
BF16 extension; elsewhere oneDNN *emulates* bf16 with fp32 instructions plus conversions, and
bf16 autocast measured 3.5x slower than fp32 (Intel Ice Lake, AVX-512 without BF16: a
1600x576x1536 matmul at 32 vs 136 GFLOP/s). oneDNN's own "is bf16 supported" answers yes on
any AVX-512 CPU because it can emulate, so it cannot decide this; the CPU's feature flags do.
``$SOFTPROMPT_CPU_BF16`` (1 or 0) overrides the flags for machines that misreport them.

Not here: what the precision is used for (the training loop, evaluation, the server).
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "SERVE_DTYPES", "cpu_flags", "cpu_has_native_bf16", "cpu_has_fast_bf16",
           "resolve_precision", "precision_name", "autocast", "fast_weight_dtype", "BF16_ENV"]

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""``--precision`` choices (training, eval, predict, demo): autocast dtype of the forward pass."""
SERVE_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""The server's ``--dtype`` choices: the base model's weight dtype."""
BF16_ENV = "SOFTPROMPT_CPU_BF16"

# CPU feature flags that mean native bf16 matrix instructions (Linux /proc/cpuinfo names).
_NATIVE_BF16_FLAGS = {
    "x86_64": ("avx512_bf16", "amx_bf16"),
    "aarch64": ("bf16",),  # Armv8.6 BF16 (BFMMLA/BFDOT): Graviton 3+, Neoverse V1/N2+
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 ``flags``, Arm ``Features``); empty
    where the OS does not say (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_has_native_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True when the CPU executes bf16 matrix multiplies natively (see the module docstring).

    ``$SOFTPROMPT_CPU_BF16=1/0`` overrides; ``flags`` / ``machine`` are for tests.
    """
    env = os.environ.get(BF16_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise ConfigError(f"${BF16_ENV} must be 1 (the CPU has native bf16) or 0 (it does not), got {env!r}")
        return env == "1"
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in _NATIVE_BF16_FLAGS.get(machine or _machine(), ()))


def cpu_has_fast_bf16() -> bool:
    """True when bf16 autocast is faster than fp32 on this CPU: native bf16 instructions and a
    torch build whose oneDNN uses them."""
    return cpu_has_native_bf16() and onednn_bf16()


def onednn_bf16() -> bool:
    """True when this torch build's oneDNN runs bf16 kernels on this CPU (it also says so where it
    only emulates them, which is why :func:`cpu_has_native_bf16` is asked first)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str, *, warn: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: no autocast, fp32).

    ``auto``: bf16 on GPUs that have it (else fp16), bf16 on CPUs with native bf16, fp32 elsewhere.
    ``bf16`` on a CPU that only emulates it still runs (the user asked), with a warning.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16 support; use fp16")
    if device.type == "cpu" and warn and not cpu_has_fast_bf16():
        _warn_emulated_bf16()
    return torch.bfloat16


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process: a command resolves its precision in several places (demo: train, then eval)."""
    log.warning("--precision bf16: this CPU has no native bf16 instructions and emulates them, which is "
                "several times slower than fp32 here (--precision auto picks fp32)")


def precision_name(amp: torch.dtype | None) -> str:
    """How a resolved precision is printed and recorded in prompt files: fp32, bfloat16, float16."""
    return "fp32" if amp is None else str(amp).replace("torch.", "")


def autocast(device: torch.device | str, amp: torch.dtype | None):
    """``torch.autocast`` to ``amp`` on ``device``; for fp32 (``amp`` None) autocast switched off."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None)


def fast_weight_dtype(dtype: str, device: torch.device | str | None) -> str:
    """The server's ``--dtype``: ``auto`` becomes the fastest weight dtype for ``device`` by the
    same rule as ``--precision auto`` (bfloat16 on GPUs with bf16 and on CPUs with native bf16,
    float16 on older GPUs, float32 elsewhere); other values are returned as given."""
    if dtype not in SERVE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(SERVE_DTYPES)}")
    if dtype != "auto":
        return dtype
    amp = resolve_precision("auto", torch.device(device or "cpu"), warn=False)
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[amp]
