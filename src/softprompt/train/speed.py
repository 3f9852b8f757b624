"""Speed and memory choices of the loop: Linear weights held in the compute dtype (undone on exit),
the attention implementation to train with, and whether a step shares each prompt's prefix, by
device. The switches that act on the model (activation checkpointing, the attention
implementation) are transformers' quirks, fenced in hf_compat.py.

Not here: precision choice (precision.py), the loop (loop.py).
"""

from __future__ import annotations

import contextlib

import torch



def resolve_attention(attention: str, device: torch.device, amp: torch.dtype | None = torch.bfloat16) -> str | None:
    """The attention implementation to train with (None: keep the model's). On CPU under bf16
    autocast, eager attention (matmul + softmax) measured ~20-30% faster per training step than
    SDPA's CPU flash kernel for prompt tuning's short sequences (its backward dominated); in fp32
    SDPA was ~7% faster (README, Training › Speed), so ``auto`` keeps the model's there."""
    if attention == "auto":
        return "eager" if device.type == "cpu" and amp is not None else None
    return None if attention == "model" else attention


def share_prompt_prefix(device: torch.device) -> bool:
    """Run each input prompt once per batch and share its keys/values with its rows (True), or pack
    it in front of every row (False); the two give the same loss (tested).

    On a CPU the step is compute-bound and sharing saves the prompt's tokens on every row (2.06x vs
    1.78x PEFT's speed, docs/guides/training.md). On a GPU a step of a small batch is bound by kernel
    launches, and sharing's extra forward pass (3 passes instead of 2: 12,378 vs 8,088 launches per
    step on SmolLM2-135M) costs more than the tokens it saves: packed was 1.4-2.1x faster per step
    on an H200 (bench/results/gpu_train_variants_h200.md). Deep prompts always share (they have no
    input embeddings).
    """
    return device.type == "cpu"


@contextlib.contextmanager
def cast_linear_weights(model, dtype: torch.dtype | None):
    """Hold the decoder's Linear weights in ``dtype`` for the duration (restored on exit).

    Under autocast every Linear casts its float32 weight to bf16 at every call, forward and
    backward; casting once per run gives the same numbers and measured ~9% faster per CPU step. On a
    GPU it also saves memory: autocast keeps each pass's bf16 weight copies for the backward pass
    (an 8B model's step peaked at 66.6 GB with per-call casts, 53.3 GB held, on an H200).
    The lm head is left alone (often tied to the input embeddings, which must stay float32).
    """
    if dtype is None:
        yield
        return
    head = model.get_output_embeddings()
    tied = {id(model.get_input_embeddings().weight)}
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head and m.weight.dtype == torch.float32 \
                and id(m.weight) not in tied:
            saved.append((m, m.weight.data, None if m.bias is None else m.bias.data))
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
    try:
        yield
    finally:
        for m, w, b in saved:
            m.weight.data = w
            if b is not None:
                m.bias.data = b
