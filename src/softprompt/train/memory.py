"""How much memory one training step's activations take, and whether to recompute them.

A step keeps every decoder layer's activations for the backward pass. Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", eq. 2) count ``34 d + 5 a s``
bytes per layer and token for a GPT block in 16 bits (d the hidden size, a the attention heads, s
the keys each token attends to). Here the count is in values of the compute dtype, with the
gated MLP's real width i: ``10 d + 2 i + 2 a s``, which matched the measured training peak of
SmolLM2-135M at batch 8 x 180 positions in float32 within 10% (12.1k estimated, 12.9k measured values per layer and token;
bench/results/train_memory_amd.md).
The lm head adds logits and their gradient for every token that carries loss. The estimate is a
bound to compare with a budget, not a prediction of the process's size (the weights, the
allocator and the libraries come on top).

Gradient checkpointing keeps only each layer's input and recomputes the rest in the backward:
activations fall to ``d`` values per layer and token, for about one more forward pass of time.

Not here: the checkpointing itself (hf_compat.gradient_checkpointing), the loop (loop.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GB = 1024**3


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch of training runs through the model."""

    batch: int
    """Rows in the micro-batch."""
    tokens: int
    """Longest row: virtual tokens + source (+ target for generation) + the label tree."""
    loss_tokens: int
    """Positions per row whose logits are computed (first label token + label tree, or the target)."""


def activation_bytes(shape: StepShape, layers: int, hidden: int, heads: int, intermediate: int, vocab: int,
                     elem_bytes: int = 4, checkpointed: bool = False) -> int:
    """Estimated activation memory of one training step (pure), see the module docstring."""
    b, s = shape.batch, shape.tokens
    if checkpointed:
        per_token = hidden  # each layer's input; one layer's activations live at a time in the backward
        block = layers * b * s * per_token + b * s * (10 * hidden + 2 * intermediate + 2 * heads * s)
    else:
        per_token = 10 * hidden + 2 * intermediate + 2 * heads * s  # norms, projections, MLP, attention scores
        block = layers * b * s * per_token
    head = 3 * b * shape.loss_tokens * vocab * 4  # float32 logits, log-softmax, gradient
    return int(block * elem_bytes + head)


def default_budget_bytes(device: torch.device) -> int:
    """Half of the memory free now: the device's on CUDA, the host's available RAM elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


def parse_budget(text: str | None) -> float | None:
    """``--memory-budget``: ``auto`` (None: from the machine), ``none`` (inf: never switch), or a
    size such as ``6GB``, ``512MB``, ``2.5`` (GB). Returns bytes; raises ValueError."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    t = str(text).strip().upper()
    if t == "NONE":
        return float("inf")
    for unit, mult in (("GB", GB), ("G", GB), ("MB", 1024**2), ("M", 1024**2)):
        if t.endswith(unit):
            t, scale = t[: -len(unit)], mult
            break
    else:
        scale = GB
    try:
        value = float(t)
    except ValueError:
        raise ValueError("not a size") from None
    if not value > 0:
        raise ValueError(f"must be positive, got {text!r}")
    return value * scale


def budget_error(text: str | None) -> str | None:
    """Why ``--memory-budget`` ``text`` is not valid, or None."""
    try:
        parse_budget(text)
    except ValueError as e:
        return f"{text!r}: {e} (auto, none, or a size such as 6GB or 512MB)"
    return None


def choose_checkpointing(explicit: bool, estimate: int, budget: float) -> tuple[bool, str | None]:
    """Whether to recompute activations (pure): always when asked, else when the estimate passes
    the budget. Returns ``(on, the line to say or None)``."""
    if explicit:
        return True, None
    if estimate > budget:
        return True, (f"gradient checkpointing on: a step's activations need ~{estimate / GB:.1f} GB, over the "
                      f"--memory-budget of {budget / GB:.1f} GB (less memory for about one more forward pass of time)")
    return False, None
