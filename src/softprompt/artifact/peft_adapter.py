"""Reading a PEFT prompt-learning adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) and getting its (P, d) virtual-token embeddings: the PEFT file
format, read without ``peft`` (only P-tuning encoder weights need it).

Not here: converting to and from prompt files (peft.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..base import BaseModel
from ..errors import PromptFileError, SoftpromptError
from .prompt_file import MAX_PROMPT_FILE_BYTES, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
"""PEFT's state-dict key for the (P, d) virtual-token embeddings of every prompt-learning method."""
META_KEY = "softprompt"
"""Safetensors header key under which export stores our :class:`PromptMeta` JSON."""
CAUSAL_LM = "CAUSAL_LM"
ENCODER_PARTS = ("embedding", "mlp_head", "lstm_head")
"""Top-level submodules of PEFT's p-tuning ``PromptEncoder``."""

UNSUPPORTED_REASONS: dict[str, str] = {
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning stores a shared prompt plus per-task factors",
    "ADAPTION_PROMPT": "adaption prompts are injected inside the attention layers",
    "CPT": "context-aware prompt tuning mixes token ids and learned deltas",
}
"""Why some prompt-like PEFT types cannot be imported; any other type gets a generic sentence."""

PEFT_INIT_NAMES: dict[str, str] = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "labels": "SAMPLE_VOCAB"}
"""Our init strategies -> PEFT's ``prompt_tuning_init`` (informational; unknown ones -> RANDOM)."""


# ----------------------------------------------------------------------------- reading an adapter


@dataclass
class PeftAdapter:
    """A PEFT adapter directory as read from disk (no checks against a base model yet)."""

    path: Path
    config: dict[str, Any]
    """``adapter_config.json`` as a dict."""
    tensors: dict[str, torch.Tensor]
    """Tensors of ``adapter_model.safetensors``."""
    header: dict[str, str] = field(default_factory=dict)
    """The safetensors ``__metadata__`` (``{"format": "pt"}`` from PEFT; plus ours from export)."""

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type") or "")

    @property
    def token_dim(self) -> int | None:
        return self.config.get("token_dim")

    @property
    def num_virtual_tokens(self) -> int | None:
        return self.config.get("num_virtual_tokens")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; :class:`PromptFileError` if unreadable."""
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"{path}: {size} bytes is too large for a prompt adapter")
    data = path.read_bytes()
    if len(data) < 8 or int.from_bytes(data[:8], "little") > len(data) - 8:
        raise PromptFileError(f"{path}: truncated or corrupt safetensors file")
    return read_safetensors(data, str(path))


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter directory as a dict.

    Raises:
        PromptFileError: missing directory or config, or garbled JSON.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise PromptFileError(f"{d}: no such PEFT adapter directory")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise PromptFileError(f"{d}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise PromptFileError(f"{cfg_path}: garbled JSON ({msg})") from None
    if not isinstance(config, dict):
        raise PromptFileError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_adapter(adapter_dir: str | os.PathLike, config: dict[str, Any] | None = None) -> PeftAdapter:
    """Read a PEFT adapter directory (``config`` if already read, and the weights).

    Raises:
        PromptFileError: missing directory, config or weights, garbled JSON, or pickle-only weights.
    """
    d = Path(adapter_dir)
    config = read_adapter_config(d) if config is None else config
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise PromptFileError(
                f"{d}: only adapter_model.bin (pickle), which softprompt never loads; "
                "re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        raise PromptFileError(f"{d}: no {WEIGHTS_NAME}")
    tensors, header = _read_safetensors(weights)
    return PeftAdapter(d, config, tensors, header)


def check_task_fields(adapter: PeftAdapter) -> int:
    """Check the config is a decoder-only causal-LM adapter with a valid P; returns P."""
    cfg, where = adapter.config, adapter.path / CONFIG_NAME
    task = cfg.get("task_type")
    if task not in (None, CAUSAL_LM):
        raise PromptFileError(
            f"{where}: task_type {task!r} is not supported; softprompt runs prompts on causal LMs ({CAUSAL_LM})"
        )
    subm = cfg.get("num_transformer_submodules")
    if subm not in (None, 1):
        raise PromptFileError(
            f"{where}: num_transformer_submodules is {subm}; only decoder-only adapters (1) can be imported"
        )
    P = adapter.num_virtual_tokens
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise PromptFileError(f"{where}: num_virtual_tokens must be a positive integer, got {P!r}")
    return P


def _check_shape_fields(adapter: PeftAdapter, base: BaseModel) -> tuple[int, int]:
    """Check the config's shape fields against each other and ``base``; returns (P, d)."""
    cfg, where = adapter.config, adapter.path / CONFIG_NAME
    P, d = check_task_fields(adapter), adapter.token_dim
    if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
        raise PromptFileError(f"{where}: token_dim must be an integer, got {d!r}")
    d = base.dim if d is None else d
    if d != base.dim:
        raise PromptFileError(
            f"{where}: token_dim {d} does not match base model {base.name!r} (width {base.dim}); "
            f"the adapter names base {cfg.get('base_model_name_or_path')!r}"
        )
    return P, d


def _check_prompt_tensor(t: torch.Tensor, P: int, d: int, where: str) -> torch.Tensor:
    """Validate a (P, d) virtual-token tensor; returns it as float32."""
    if t.dim() != 2 or tuple(t.shape) != (P, d):
        raise PromptFileError(
            f"{where}: {PROMPT_KEY} has shape {tuple(t.shape)} but adapter_config.json says "
            f"num_virtual_tokens={P}, token_dim={d}"
        )
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise PromptFileError(f"{where}: {PROMPT_KEY} holds non-finite or non-float values")
    return t.to(torch.float32)


def _encoder_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a p-tuning encoder state dict with any ``[base_model.]prompt_encoder.<name>.`` prefix removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        while parts and parts[0] not in ENCODER_PARTS:
            parts = parts[1:]
        if parts:
            out[".".join(parts)] = value
    return out


def _names(tensors: Mapping[str, torch.Tensor], most: int = 5) -> str:
    """A short list of tensor names for an error message."""
    names = sorted(tensors)
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return (", ".join(names[:most]) + more) if names else "no tensors"


def prompt_tuning_embeddings(adapter: PeftAdapter, P: int, d: int) -> torch.Tensor:
    """PROMPT_TUNING: the saved ``prompt_embeddings`` are the virtual tokens, (P, d)."""
    where = str(adapter.path / WEIGHTS_NAME)
    if PROMPT_KEY not in adapter.tensors:
        raise PromptFileError(f"{where}: missing tensor {PROMPT_KEY!r} (found {_names(adapter.tensors)})")
    return _check_prompt_tensor(adapter.tensors[PROMPT_KEY], P, d, where)


def p_tuning_embeddings(adapter: PeftAdapter, P: int, d: int) -> torch.Tensor:
    """P_TUNING: ``prompt_embeddings`` if saved (PEFT ran the encoder at save time), else run the
    saved encoder weights once through PEFT's ``PromptEncoder``; returns (P, d)."""
    if PROMPT_KEY in adapter.tensors:
        return prompt_tuning_embeddings(adapter, P, d)
    where = str(adapter.path / WEIGHTS_NAME)
    state = _encoder_state(adapter.tensors)
    if "embedding.weight" not in state or not any(k.startswith(("mlp_head.", "lstm_head.")) for k in state):
        raise PromptFileError(
            f"{where}: missing tensor {PROMPT_KEY!r} and no prompt-encoder weights (found {_names(adapter.tensors)})"
        )
    try:
        from peft import PromptEncoderConfig
        from peft.tuners.p_tuning import PromptEncoder
    except ImportError:
        raise SoftpromptError(
            "importing a P-tuning prompt encoder needs the peft package: pip install 'softprompt[peft]'"
        ) from None
    known = {f.name for f in dataclasses.fields(PromptEncoderConfig)}
    kw = {k: v for k, v in adapter.config.items() if k in known}
    kw.update(inference_mode=False, token_dim=d, num_virtual_tokens=P, num_transformer_submodules=1)
    if kw.get("encoder_hidden_size") is None:
        if "lstm_head.weight_ih_l0" in state:  # (4 * hidden, d): the LSTM's four gates
            kw["encoder_hidden_size"] = state["lstm_head.weight_ih_l0"].shape[0] // 4
        elif "mlp_head.0.weight" in state:  # (hidden, d)
            kw["encoder_hidden_size"] = state["mlp_head.0.weight"].shape[0]
    try:
        encoder = PromptEncoder(PromptEncoderConfig(**kw))
        encoder.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # torch's message spans several lines
        raise PromptFileError(f"{where}: prompt-encoder weights do not fit adapter_config.json ({msg})") from None
    encoder.eval()
    with torch.no_grad():
        out = encoder(torch.arange(P)[None])[0]  # (1, P) ids -> (1, P, d) -> (P, d)
    return _check_prompt_tensor(out.detach(), P, d, where)


IMPORTERS: dict[str, Callable[[PeftAdapter, int, int], torch.Tensor]] = {
    "PROMPT_TUNING": prompt_tuning_embeddings,
    "P_TUNING": p_tuning_embeddings,
}
"""PEFT types that import, by ``peft_type``; each returns the (P, d) float32 virtual tokens."""
