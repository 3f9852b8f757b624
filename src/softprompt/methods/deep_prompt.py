"""The deep prompt (method "prefix"): P trained keys/values at every layer (prefix tuning, Li &
Liang 2021; P-tuning v2, Liu et al. 2022), one tensor (layers, 2, kv_heads, P, head_dim): per
layer the keys ([:, 0], after the rotary embedding) and values ([:, 1]) as the HF cache holds them.
The tensor *is* its key/value prefix: serving runs nothing through the model for it.

A deep prompt starts from the keys/values of real tokens: the input-prompt init (any ``--init``)
runs through the model once (:func:`deep_init`).

Not here: its reparameterisations (trainable.py), reading sources after it (prefix.py), its PEFT
layout (artifact/peft_prefix.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model import PromptedModel
from ..prefix import PrefixKV
from .method import Meta, PromptMethod


def deep_init(pm: PromptedModel, prompt: torch.Tensor) -> torch.Tensor:
    """The keys/values of an input prompt (P, d) at every layer: (layers, 2, H, P, hd) float32."""
    kv = PrefixKV.compute(pm, prompt)  # per layer (H, P, hd) x 2
    return torch.stack([torch.stack([k, v]) for k, v in kv.layers]).float()  # (L, 2, H, P, hd)


class DeepPrompt(nn.Module):
    """A deep prompt: one float32 master tensor (layers, 2, kv_heads, P, head_dim)."""

    def __init__(self, kv: torch.Tensor):
        super().__init__()
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ConfigError(f"a deep prompt needs a (layers, 2, kv_heads, P, head_dim) tensor, got {tuple(kv.shape)}")
        self.weight = nn.Parameter(kv.detach().to(torch.float32).clone())  # (L, 2, H, P, hd)

    def forward(self) -> torch.Tensor:
        return self.weight


def _measure(tensor: torch.Tensor) -> dict[str, Any]:
    if tensor.dim() != 5 or tensor.shape[1] != 2 or tensor.shape[3] < 1:
        raise ValueError(f"a deep prompt tensor must be (layers, 2, kv_heads, P, head_dim), got shape {tuple(tensor.shape)}")
    L, _, H, P, hd = (int(n) for n in tensor.shape)
    return {"length": P, "kv_layout": [L, H, hd]}


def _shape(meta: Meta) -> tuple[int, ...]:
    layout = meta.kv_layout
    if not (isinstance(layout, list) and len(layout) == 3
            and all(isinstance(n, int) and n > 0 for n in layout)):
        raise ValueError("deep prompt metadata lacks a valid kv_layout [layers, kv_heads, head_dim]")
    L, H, hd = layout
    return (L, 2, H, meta.length, hd)  # (layers, 2, kv_heads, P, head_dim)


def _base_mismatch(meta: Meta, base) -> str | None:
    if base.kv_layout is None or list(meta.kv_layout or ()) == list(base.kv_layout):
        return None  # a base without a kv_layout (a front end holding only the embeddings) cannot tell
    (L, H, hd), (bL, bH, bhd) = meta.kv_layout, base.kv_layout
    return (f"deep prompt for {L} layers x {H} kv heads x head dim {hd} does not match base model "
            f"{base.name!r} ({bL} layers x {bH} kv heads x head dim {bhd})")


def _shape_words(meta: Meta) -> str:
    L, H, hd = meta.kv_layout
    return f"deep prompt: {L} layers x 2 (keys, values) x {H} kv heads x {meta.length} virtual tokens x {hd} head dims"


def _report_shape(meta: Meta) -> str:
    L, H, hd = meta.kv_layout
    return f"{meta.length} virtual tokens at every layer: {L} layers x keys/values x {H} kv heads x {hd} ({meta.dtype})"


def _serve(pm: PromptedModel, tensor: torch.Tensor) -> tuple[torch.Tensor, PrefixKV]:
    tensor = tensor.to(pm.base.device, pm.lm.dtype)  # (layers, 2, H, P, hd)
    return tensor, PrefixKV.from_deep(tensor)  # its stored keys/values are the prefix


DEEP_PROMPT = PromptMethod(
    name="prefix",
    title="deep prompt",
    about="deep prompt: P trained keys/values at every layer (prefix tuning, P-tuning v2)",
    holds="keys/values at every layer",
    report_note="at every layer (deep prompt)",
    tensor_name="prefix",
    format_version=2,
    measure=_measure,
    shape=_shape,
    base_mismatch=_base_mismatch,
    shape_words=_shape_words,
    report_shape=_report_shape,
    peft_type="PREFIX_TUNING",
    peft_imports=("PREFIX_TUNING",),
    lr=0.01,  # at 0.1 deep prompts fell to the majority class on noisy tweets; at 0.01 they passed
    #          LoRA r=8 on tweet-imbalanced dev (docs/benchmarks/quality.md)
    start=lambda pm, init: deep_init(pm, init.to(pm.base.device)),
    trainable=lambda tensor, device: DeepPrompt(tensor).to(device),
    shardable=False,
    serve=_serve,
    backends=("transformers",),
)
