"""Speed and memory switches the loop wraps around the model, each undone on exit: activation
checkpointing, the attention implementation, Linear weights held in the compute dtype.

Not here: precision choice (precision.py), the loop (loop.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import ConfigError


def _cache_lengths(cache) -> list[int]:
    return [layer.get_seq_length() for layer in getattr(cache, "layers", None) or []]


def _checkpoint_with_cache(function, *args):
    """``torch.utils.checkpoint`` for one decoder layer that may write a KV cache.

    Rank classification reads the source pass's cache, so the layers must keep writing it under
    checkpointing. The recomputation in backward would append the layer's keys/values a second
    time; before it runs, every cache layer is cropped back to the length the forward saw.
    """
    from torch.utils.checkpoint import checkpoint

    kw = getattr(function, "keywords", {})
    cache = kw.get("cache", kw.get("past_key_values"))  # transformers >= 5.24 / before
    before = _cache_lengths(cache)
    calls = [0]

    def run(*a):
        if calls[0] and cache is not None:  # the recomputation: restore the cache as the forward saw it
            for i, layer in enumerate(cache.layers):
                extra = layer.get_seq_length() - (before[i] if i < len(before) else 0)
                if extra > 0:
                    layer.crop(-extra)
        calls[0] += 1
        return function(*a)

    return checkpoint(run, *args, use_reentrant=False)


class _DropCacheWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # our layers keep their cache on purpose
        return "incompatible with gradient checkpointing" not in record.getMessage()


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool):
    """Recompute each decoder layer's activations in the backward pass (less memory, more time).

    Quirks of HF activation checkpointing (fenced here): it runs only in training mode, and it
    drops the KV cache that rank classification reads. We flip only the decoder layers to training
    mode (dropout modules stay in eval), let them keep their cache, and checkpoint with
    :func:`_checkpoint_with_cache`, which restores the cache before each recomputation.
    The model is left as it was on exit.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not hasattr(model, "activation_checkpointing_enable"):
        raise ConfigError("--gradient-checkpointing: this model does not support activation checkpointing")
    model.activation_checkpointing_enable()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m.training = True
        m._can_checkpoint_with_cache = True
        m._gradient_checkpointing_func = _checkpoint_with_cache
    quiet = _DropCacheWarning()
    hf_log = logging.getLogger("transformers.modeling_layers")
    hf_log.addFilter(quiet)
    try:
        yield
    finally:
        hf_log.removeFilter(quiet)
        for m in layers:
            m.training = False
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        model.activation_checkpointing_disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def resolve_attention(attention: str, device: torch.device, amp: torch.dtype | None = torch.bfloat16) -> str | None:
    """The attention implementation to train with (None: keep the model's). On CPU under bf16
    autocast, eager attention (matmul + softmax) measured ~20-30% faster per training step than
    SDPA's CPU flash kernel for prompt tuning's short sequences (its backward dominated); in fp32
    SDPA was ~7% faster (README, Training › Speed), so ``auto`` keeps the model's there."""
    if attention == "auto":
        return "eager" if device.type == "cpu" and amp is not None else None
    return None if attention == "model" else attention


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Switch the model's attention implementation for the duration (restored on exit)."""
    old = getattr(model.config, "_attn_implementation", None)
    if name is None or old == name or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@contextlib.contextmanager
def cast_linear_weights(model, dtype: torch.dtype | None):
    """Hold the decoder's Linear weights in ``dtype`` for the duration (restored on exit).

    Under autocast every Linear casts its float32 weight to bf16 at every call, forward and
    backward; casting once per run gives the same numbers and measured ~9% faster per CPU step.
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
