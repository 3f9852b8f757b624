"""Every transformers / torch version quirk and model-family quirk softprompt depends on, fenced in
one place: one function each, with a comment saying what it works around. The core (model.py,
prefix.py, the loop, the engine) calls these instead of reading private attributes or checking
versions itself.

Not here: what softprompt does with a model (model.py), loading it (base.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any

from torch import nn

from .errors import ConfigError


# ----------------------------------------------------------------------------- config readers


def attn_implementation(config) -> str | None:
    """The attention implementation a model was loaded with (a private config attribute in transformers)."""
    return getattr(config, "_attn_implementation", None)


def layer_kinds(config) -> list[str] | None:
    """The decoder's attention kind per layer (``layer_types``: "full_attention", "sliding_attention",
    "linear_attention"...), or None for models that do not list them (all full attention, or one
    ``sliding_window`` for every layer)."""
    return getattr(config.get_text_config(decoder=True), "layer_types", None)


def text_config(config):
    """The text decoder's config of a (possibly multimodal) model config; configs of older
    transformers versions lack ``get_text_config``."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the decoder's key/value cache, from its config.

    Families name these differently: Llama/Qwen/Gemma ``num_hidden_layers``,
    ``num_key_value_heads`` (grouped-query) and ``head_dim`` (Gemma's is not hidden / heads);
    GPT-2 ``n_layer`` / ``n_head`` / ``n_embd``."""
    c = text_config(config)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def decoder_layer_names(model: nn.Module) -> set[str]:
    """Class names of the model's decoder layers: transformers names them in ``_no_split_modules``
    (meant for device maps; the only place a model lists its layer class)."""
    return set(getattr(model, "_no_split_modules", None) or ())


def drop_gguf_quantization(model) -> None:
    """transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    weights are already dequantized float32 tensors: unmark it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def sliding_window(config) -> int | None:
    """The window of a model whose decoder has sliding-window attention layers; None for full
    attention. Either ``layer_types`` lists ``sliding_attention`` (Gemma 2/3, Cohere 2, gpt-oss ...)
    or, without ``layer_types``, a ``sliding_window`` applies to every layer (Mistral 7B v0.1)."""
    text = config.get_text_config(decoder=True)
    kinds = getattr(text, "layer_types", None)
    if kinds is not None and "sliding_attention" not in kinds:
        return None
    return getattr(text, "sliding_window", None)


def position_window(config) -> int | None:
    """The window :meth:`PromptedModel.decode` applies by position through :func:`position_masks`:
    a sliding-window model's under eager or sdpa attention (they take additive 4D masks); else None."""
    if attn_implementation(config) not in ("eager", "sdpa"):
        return None
    return sliding_window(config)


# ----------------------------------------------------------------------------- the KV-cache argument


def cache_argument(module: nn.Module) -> str:
    """The name ``module.forward`` takes the KV cache under: ``cache`` from transformers 5.24,
    ``past_key_values`` before (a quirk of the version, fenced here)."""
    return _cache_argument(type(module))


@functools.lru_cache(maxsize=None)
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: Any):
    """The KV cache of a model output (``out.cache`` from transformers 5.24, ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ----------------------------------------------------------------------------- switches on a loaded model


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Switch the model's attention implementation for the duration (restored on exit)."""
    old = attn_implementation(model.config)
    if name is None or old == name or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


# ----------------------------------------------------------------------------- activation checkpointing


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
