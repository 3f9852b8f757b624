"""Hugging Face PEFT interoperability: prompt files <-> PEFT prompt-learning adapter directories.

A PEFT adapter directory holds ``adapter_config.json`` (a ``PromptTuningConfig`` /
``PromptEncoderConfig`` as JSON) and ``adapter_model.safetensors`` with one tensor,
``prompt_embeddings`` (P, d) (``peft.tuners.tuners_utils.BasePromptEncoder._get_adapter_state_dict``).
PEFT prepends those rows to the input embeddings of a causal LM exactly as :class:`PromptedModel`
does, so a prompt moves between the two without loss:

- export writes both files itself (no ``peft`` needed); the tensor is float32 (a superset of our
  float16/bfloat16 storage, so nothing is rounded), and our full metadata (template, labels,
  fingerprint...) rides along in the safetensors header, where PEFT ignores it and import restores it.
- import of ``PROMPT_TUNING`` reads the tensor (no ``peft`` needed). ``P_TUNING`` adapters saved by
  PEFT's ``save_pretrained`` also hold ``prompt_embeddings``: PEFT runs the prompt encoder when it
  saves, so the tensor already *is* the virtual-token embeddings. A P-tuning adapter that holds the
  encoder's own weights instead (``embedding`` + ``mlp_head``/``lstm_head``, e.g. a training
  checkpoint of ``prompt_encoder.state_dict()``) is run once through PEFT's own ``PromptEncoder``
  (this needs ``peft``).

Not here: prefix tuning, LoRA and other PEFT methods (they do not prepend input embeddings), and
encoder-decoder adapters (``num_transformer_submodules`` 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .artifact import (
    MAX_PROMPT_FILE_BYTES,
    STORAGE_DTYPES,
    LoadedPrompt,
    PromptMeta,
    atomic_write_bytes,
    check_compatible,
    load_prompt,
    read_safetensors,
    safetensors_bytes,
    save_prompt,
)
from .base import DEFAULT_MODEL, EMBEDDED_NAME, BaseModel
from .errors import ConfigError, PromptFileError, SoftpromptError
from .hf_compat import text_config

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
    "PREFIX_TUNING": "prefix tuning stores per-layer keys/values, not input embeddings",
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


def _check_shape_fields(adapter: PeftAdapter, base: BaseModel) -> tuple[int, int]:
    """Check the config's shape fields against each other and ``base``; returns (P, d)."""
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
    P, d = adapter.num_virtual_tokens, adapter.token_dim
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise PromptFileError(f"{where}: num_virtual_tokens must be a positive integer, got {P!r}")
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


def _stored_meta(adapter: PeftAdapter) -> PromptMeta | None:
    """Our metadata from the header of an adapter that softprompt exported, else None."""
    raw = adapter.header.get(META_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(PromptMeta)}
        return PromptMeta(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise PromptFileError(f"{adapter.path / WEIGHTS_NAME}: corrupt softprompt metadata in the header") from None


def _task_fields(
    stored: PromptMeta | None,
    task: str | None,
    template: str | None,
    labels: Sequence[str] | None,
    verbalizer: Mapping[str, str] | None,
) -> dict[str, Any]:
    """Task type, template, labels, verbalizer: the flags, else what an exported adapter stored;
    validated by :class:`~softprompt.data.TaskSpec` when a task is known."""
    from .data import TaskSpec

    if stored is not None and task in (None, stored.task):  # flags override field by field
        task = stored.task
        template = template if template is not None else stored.template
        labels = labels if labels is not None else stored.labels
        verbalizer = verbalizer if verbalizer is not None else stored.verbalizer
    if task is None and labels:
        task = "classify"
    if task is None:
        if template is not None or verbalizer:
            raise ConfigError("--template and --verbalizer need --task (PEFT adapters do not record the task)")
        return {"task": None, "template": None, "labels": None, "verbalizer": None}
    spec = TaskSpec(kind=task, template=template, labels=list(labels) if labels else None,
                    verbalizer=dict(verbalizer) if verbalizer else None)
    return spec.to_meta()


def import_peft(
    adapter_dir: str | os.PathLike,
    base: BaseModel,
    *,
    task: str | None = None,
    template: str | None = None,
    labels: Sequence[str] | None = None,
    verbalizer: Mapping[str, str] | None = None,
    name: str | None = None,
    strict: bool = True,
) -> LoadedPrompt:
    """Read a PEFT ``PROMPT_TUNING`` or ``P_TUNING`` adapter as a prompt for ``base``.

    The fingerprint comes from ``base`` (PEFT records only a model name, kept in
    ``meta.extra["peft"]["base_model_name_or_path"]``). Task type, template, labels and verbalizer
    are not stored by PEFT, so they come from the arguments (or, for an adapter that softprompt
    exported, from the metadata it stored, which is then also checked against ``base``).

    Args:
        adapter_dir: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: the base model the prompt will run on; its width must equal the adapter's token_dim.
        task: "classify" or "generate" (inferred as "classify" when ``labels`` are given).
        template, labels, verbalizer, name: task metadata to record.
        strict: refuse an exported adapter whose stored fingerprint is another model's.
    Returns:
        A :class:`LoadedPrompt` with the (P, d) float32 tensor; ``meta.dtype`` is the adapter's own
        storage dtype, so :func:`save_imported` writes it without rounding.
    Raises:
        PromptFileError: unsupported PEFT type or an inconsistent adapter (one line each).
    """
    config = read_adapter_config(adapter_dir)
    where = Path(adapter_dir) / CONFIG_NAME
    ptype = str(config.get("peft_type") or "")
    if not ptype:
        raise PromptFileError(f"{where}: no peft_type (not a PEFT adapter config)")
    if ptype not in IMPORTERS:
        reason = UNSUPPORTED_REASONS.get(ptype, "it does not prepend virtual tokens to the input")
        raise PromptFileError(
            f"{where}: PEFT type {ptype} is not supported ({reason}); softprompt imports {' and '.join(IMPORTERS)}"
        )
    adapter = read_adapter(adapter_dir, config)  # after the type check: a LoRA file may be large
    P, d = _check_shape_fields(adapter, base)
    tensor = IMPORTERS[ptype](adapter, P, d)  # (P, d) float32
    stored = _stored_meta(adapter)
    if stored is not None:
        check_compatible(stored, base, str(adapter.path), strict=strict)
    raw = adapter.tensors.get(PROMPT_KEY)
    src_dtype = next((k for k, v in STORAGE_DTYPES.items() if raw is not None and raw.dtype == v), "float32")
    extra = dict(stored.extra) if stored else {}
    facts = {
        "peft_type": ptype,
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "peft_version": adapter.config.get("peft_version"),
        "imported_from": str(adapter.path),
    }
    extra["peft"] = {k: v for k, v in facts.items() if v is not None}
    meta = PromptMeta.for_base(
        base, P,
        **_task_fields(stored, task, template, labels, verbalizer),
        name=name if name is not None else (stored.name if stored else None),
        training=dict(stored.training) if stored else {},
        extra=extra,
    )
    meta.dtype = stored.dtype if stored is not None and stored.dtype in STORAGE_DTYPES else src_dtype
    return LoadedPrompt(tensor, meta, None)


def save_imported(loaded: LoadedPrompt, path: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write an imported prompt as a prompt file.

    Args:
        dtype: storage dtype; None keeps ``loaded.meta.dtype`` (the adapter's own, so no rounding).
    """
    return save_prompt(path, loaded.tensor, loaded.meta, dtype or loaded.meta.dtype)


# ----------------------------------------------------------------------------- export


def peft_base_name(name: str) -> str:
    """The ``base_model_name_or_path`` PEFT should load for a prompt trained on ``name``.

    The embedded default is recorded as ``...@gguf-q4_1`` (dequantized 4-bit weights), which no
    hub or PEFT loader resolves; PEFT gets the hub id of the same model.
    """
    return DEFAULT_MODEL if name == EMBEDDED_NAME else name


def peft_config_dict(
    meta: PromptMeta,
    *,
    base_model_name: str | None = None,
    model_config: Any = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PROMPT_TUNING adapter for a prompt (pure function).

    Args:
        meta: the prompt's metadata (P, d, base model name, training summary).
        base_model_name: ``base_model_name_or_path`` to record; default :func:`peft_base_name`.
        model_config: the base model's HF config, for ``num_layers`` / ``num_attention_heads``
            (None leaves them null; PEFT then fills them from the base model when it loads).
    """
    num_layers = num_heads = None
    if model_config is not None:
        text = text_config(model_config)
        num_layers = getattr(text, "num_hidden_layers", None)
        num_heads = getattr(text, "num_attention_heads", None)
    init = PEFT_INIT_NAMES.get(str((meta.training or {}).get("init", "")), "RANDOM")
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name or peft_base_name(meta.base_model),
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": meta.length,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": CAUSAL_LM,
        "token_dim": meta.dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def _local_model_config(name: str) -> Any:
    """The HF config of a base model if it is available locally (embedded default, a folder, or
    the hub cache), else None. Never goes to the network."""
    from transformers import AutoConfig

    if name == EMBEDDED_NAME:
        from .base import resolve_model

        name = resolve_model(None)[1]
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def export_peft(
    prompt: str | os.PathLike | LoadedPrompt,
    out_dir: str | os.PathLike,
    *,
    base: BaseModel | None = None,
    base_model_name: str | None = None,
    model_config: Any = None,
    strict: bool = True,
) -> Path:
    """Write a prompt as a PEFT PROMPT_TUNING adapter directory (``peft`` not needed).

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` then prepends exactly this prompt.

    Args:
        prompt: a prompt file path or a :class:`LoadedPrompt`.
        out_dir: the adapter directory (created; its two adapter files are replaced atomically).
        base: if given, the prompt is checked against it and its config fills num_layers /
            num_attention_heads.
        base_model_name: ``base_model_name_or_path`` to record (default: the prompt's base model).
        model_config: an HF config to take num_layers / num_attention_heads from when ``base`` is
            None (default: the prompt's base model's config, if it is available locally).
        strict: with ``base``, refuse a prompt whose fingerprint is another model's.
    Returns:
        The adapter directory.
    """
    loaded = prompt if isinstance(prompt, LoadedPrompt) else load_prompt(prompt)
    meta = loaded.meta
    where = str(loaded.path or "prompt")
    if tuple(loaded.tensor.shape) != (meta.length, meta.dim):
        raise PromptFileError(f"{where}: tensor shape {tuple(loaded.tensor.shape)} does not match its metadata")
    if base is not None:
        check_compatible(meta, base, where, strict=strict)
        model_config = base.model.config
    elif model_config is None:
        model_config = _local_model_config(meta.base_model)
    config = peft_config_dict(meta, base_model_name=base_model_name, model_config=model_config)
    tensor = loaded.tensor.detach().to("cpu", torch.float32).contiguous()  # (P, d): exact for fp16/bf16 sources
    header = {"format": "pt", META_KEY: json.dumps(asdict(meta), sort_keys=True)}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PromptFileError(f"{out}: exists and is not a directory")
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors_bytes({PROMPT_KEY: tensor}, header))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out
