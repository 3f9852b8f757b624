"""The input prompt (method "prompt"): P virtual-token embeddings (P, d) in front of the input
(Lester et al. 2021). Its key/value prefix is made by running it through the model.

Not here: the trainable module and its init strategies (prompt.py), how it is packed in front of
the input (model.py) or turned into a key/value prefix (prefix.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ..prompt import SoftPrompt
from .method import Meta, PromptMethod


def _measure(tensor: torch.Tensor) -> dict[str, Any]:
    if tensor.dim() != 2:
        raise ValueError(f"an input prompt tensor must be (P, d), got shape {tuple(tensor.shape)}")
    return {"length": int(tensor.shape[0]), "dim": int(tensor.shape[1]), "kv_layout": None}


def _shape(meta: Meta) -> tuple[int, ...]:
    return (meta.length, meta.dim)  # (P, d)


def _serve(pm, tensor: torch.Tensor) -> tuple[torch.Tensor, None]:
    return tensor.to(pm.base.device), None  # (P, d); the bank runs it through the model on first use


INPUT_PROMPT = PromptMethod(
    name="prompt",
    title="input prompt",
    about="input prompt: P virtual-token embeddings (P, d) in front of the input (Lester et al.)",
    holds="input embeddings",
    report_note="",
    tensor_name="prompt",
    format_version=1,
    measure=_measure,
    shape=_shape,
    base_mismatch=lambda meta, base: None,  # the width, checked for every method, is all it needs
    shape_words=lambda meta: f"input prompt: {meta.length} virtual tokens x {meta.dim} dims",
    report_shape=lambda meta: f"{meta.length} virtual tokens x {meta.dim} dims ({meta.dtype})",
    peft_type="PROMPT_TUNING",
    peft_imports=("PROMPT_TUNING", "P_TUNING"),
    lr=0.1,
    start=None,
    trainable=lambda tensor, device: SoftPrompt(tensor).to(device),
    shardable=True,
    serve=_serve,
    backends=("transformers", "vllm"),
)
