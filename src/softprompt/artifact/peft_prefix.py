"""PEFT ``PREFIX_TUNING`` adapters <-> deep prompts (method "prefix"): the layout of the one tensor.

A PEFT prefix-tuning adapter (``PrefixTuningConfig``, ``prefix_projection=False``) saves
``prompt_embeddings`` (P, num_layers * 2 * token_dim), the prefix encoder's embedding weight.
``PeftModel.get_prompt`` (peft 0.21.2, ``peft_model.py``) reads it as

    view(B, P, num_layers * 2, num_attention_heads, token_dim // num_attention_heads)
    .permute(2, 0, 3, 1, 4).split(2)   ->  per layer l: keys = row 2l, values = row 2l + 1

and hands those to the model as its ``DynamicCache``. For grouped-query models PEFT's
``_prepare_prompt_learning_config`` (``utils/other.py``) sets ``num_attention_heads`` to the model's
key/value heads and ``token_dim`` to kv_heads * head_dim before the adapter is built or saved, so
``token_dim // num_attention_heads`` is the head dim and the heads are the cache's heads.
Our deep prompt (layers, 2, kv_heads, P, head_dim) is the same numbers: ``[l, k, h, p]`` is PEFT's
``[p, 2l + k, h]``, a permute and a reshape each way, nothing rounded.

A ``prefix_projection=True`` adapter saved by PEFT also holds the projected ``prompt_embeddings``
(PEFT runs the MLP when it saves); one that holds the MLP's own weights (a training checkpoint)
is run once here (embedding -> Linear -> tanh -> Linear, PEFT's ``PrefixEncoder``), no ``peft`` needed.

Not here: prompt-tuning adapters and the common import/export steps (peft.py), reading the
adapter files (peft_adapter.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..base import BaseModel
from ..errors import PromptFileError
from .peft_adapter import CAUSAL_LM, CONFIG_NAME, PROMPT_KEY, WEIGHTS_NAME, PeftAdapter, _names, check_task_fields
from .prompt_file import PromptMeta

PREFIX_TUNING = "PREFIX_TUNING"
PROJECTION_KEYS = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
"""State-dict keys of PEFT's ``PrefixEncoder`` with ``prefix_projection=True`` (adapter prefix stripped)."""


def to_peft(kv: torch.Tensor) -> torch.Tensor:
    """A deep prompt (layers, 2, kv_heads, P, head_dim) as PEFT's ``prompt_embeddings`` (P, layers * 2 * kv_heads * head_dim)."""
    L, two, H, P, hd = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * H * hd)  # (P, L, 2, H, hd) -> (P, L*2*H*hd)


def from_peft(emb: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's ``prompt_embeddings`` (P, layers * 2 * kv_heads * head_dim) as a deep prompt (layers, 2, kv_heads, P, head_dim)."""
    P = emb.shape[0]
    return emb.reshape(P, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()  # (L, 2, H, P, hd)


def prefix_config_dict(meta: PromptMeta, base_model_name: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PREFIX_TUNING adapter for a deep prompt (pure function):
    the fields PEFT's ``save_pretrained`` writes, with heads and width already grouped-query
    adjusted as PEFT adjusts them (so loading changes nothing)."""
    L, H, hd = meta.kv_layout
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "encoder_hidden_size": H * hd,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": H,
        "num_layers": L,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": meta.length,
        "peft_type": PREFIX_TUNING,
        "prefix_projection": False,
        "revision": None,
        "task_type": CAUSAL_LM,
        "token_dim": H * hd,
    }


def _int_field(cfg: dict, key: str, default: int, where) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PromptFileError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _check_layout(adapter: PeftAdapter, base: BaseModel) -> None:
    """The config's layers, heads and width must be ``base``'s key/value cache (PEFT's view of the tensor)."""
    cfg, where = adapter.config, adapter.path / CONFIG_NAME
    L, H, hd = base.kv_layout
    layers = _int_field(cfg, "num_layers", L, where)
    width = _int_field(cfg, "token_dim", H * hd, where)
    heads = _int_field(cfg, "num_attention_heads", H, where)
    if (layers, width, heads) != (L, H * hd, H):
        raise PromptFileError(
            f"{where}: num_layers={layers}, token_dim={width}, num_attention_heads={heads} do not match base model "
            f"{base.name!r} ({L} layers x {H} kv heads x head dim {hd}: token_dim {H * hd}); "
            f"the adapter names base {cfg.get('base_model_name_or_path')!r}"
        )


def _project(state: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """Run a prefix-projection MLP once: embedding (P, d) -> Linear -> tanh -> Linear -> (P, L * 2 * token_dim)."""
    found = {k: next((v for name, v in state.items() if name == k or name.endswith("." + k)), None) for k in PROJECTION_KEYS}
    if any(v is None for v in found.values()):
        raise PromptFileError(f"{where}: missing tensor {PROMPT_KEY!r} and no prefix-projection weights (found {_names(state)})")
    e, w0, b0, w2, b2 = (found[k].to(torch.float32) for k in PROJECTION_KEYS)
    try:  # as PEFT's PrefixEncoder.forward computes it
        return F.linear(torch.tanh(F.linear(e, w0, b0)), w2, b2)  # (P, d) -> (P, hidden) -> (P, L*2*token_dim)
    except RuntimeError as e_:
        raise PromptFileError(f"{where}: prefix-projection weights do not fit together ({' '.join(str(e_).split())[:200]})") from None


def prefix_tuning_kv(adapter: PeftAdapter, base: BaseModel) -> torch.Tensor:
    """PREFIX_TUNING: the adapter's per-layer keys/values as a deep prompt for ``base``,
    (layers, 2, kv_heads, P, head_dim) float32."""
    P = check_task_fields(adapter)
    _check_layout(adapter, base)
    where = str(adapter.path / WEIGHTS_NAME)
    L, H, hd = base.kv_layout
    if PROMPT_KEY in adapter.tensors:
        emb = adapter.tensors[PROMPT_KEY]
    elif adapter.config.get("prefix_projection"):
        emb = _project(adapter.tensors, where)
    else:
        raise PromptFileError(f"{where}: missing tensor {PROMPT_KEY!r} (found {_names(adapter.tensors)})")
    if tuple(emb.shape) != (P, L * 2 * H * hd):
        raise PromptFileError(
            f"{where}: {PROMPT_KEY} has shape {tuple(emb.shape)} but a {P}-token prefix for base model {base.name!r} "
            f"is ({P}, {L * 2 * H * hd}) (num_layers {L} x 2 x token_dim {H * hd})"
        )
    if not emb.is_floating_point() or not torch.isfinite(emb).all():
        raise PromptFileError(f"{where}: {PROMPT_KEY} holds non-finite or non-float values")
    return from_peft(emb.to(torch.float32), L, H, hd)


DEEP_IMPORTERS = {PREFIX_TUNING: prefix_tuning_kv}
"""PEFT types that import as deep prompts, by ``peft_type``; each returns (layers, 2, kv_heads, P, head_dim) float32."""
