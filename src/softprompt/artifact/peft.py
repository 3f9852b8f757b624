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

A deep prompt (method "prefix") moves the same way as a ``PREFIX_TUNING`` adapter, its keys/values
laid out as PEFT's ``get_prompt`` reads them (peft_prefix.py). A deep prompt cannot be a
PROMPT_TUNING adapter, nor an input prompt a PREFIX_TUNING one: export refuses both in one line.

Not here: reading the PEFT files (peft_adapter.py), the prefix-tuning layout (peft_prefix.py); LoRA
and other PEFT methods (they neither prepend input embeddings nor keys/values), and encoder-decoder
adapters (``num_transformer_submodules`` 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..base import DEFAULT_MODEL, EMBEDDED_NAME, BaseModel
from ..errors import ConfigError, PromptFileError
from ..hf_compat import text_config
from ..methods import METHODS, PromptMethod, method, method_for_peft
from .prompt_file import (
    STORAGE_DTYPES, LoadedPrompt, PromptMeta, atomic_write_bytes, check_compatible, load_prompt, safetensors_bytes,
    save_prompt, tensor_shape,
)
from .peft_adapter import (
    IMPORTERS, CONFIG_NAME, WEIGHTS_NAME, PROMPT_KEY, META_KEY, CAUSAL_LM, UNSUPPORTED_REASONS,
    PEFT_INIT_NAMES, PeftAdapter, read_adapter_config, read_adapter, _check_shape_fields,
)
from .peft_prefix import DEEP_IMPORTERS, PREFIX_TUNING, prefix_config_dict, to_peft


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
    from ..data import TaskSpec
    from ..tasks import labelled_kind

    if stored is not None and task in (None, stored.task):  # flags override field by field
        task = stored.task
        template = template if template is not None else stored.template
        labels = labels if labels is not None else stored.labels
        verbalizer = verbalizer if verbalizer is not None else stored.verbalizer
    if task is None and labels:
        task = labelled_kind(True).name
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
    """Read a PEFT ``PROMPT_TUNING`` or ``P_TUNING`` adapter as an input prompt for ``base``, or a
    ``PREFIX_TUNING`` adapter as a deep prompt (method "prefix").

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
        A :class:`LoadedPrompt` with the float32 tensor, (P, d) or (layers, 2, kv_heads, P, head_dim);
        ``meta.dtype`` is the adapter's own storage dtype, so :func:`save_imported` writes it without rounding.
    Raises:
        PromptFileError: unsupported PEFT type or an inconsistent adapter (one line each).
    """
    adapter, tensor, m = _read_prompt(adapter_dir, base)
    ptype = adapter.peft_type
    shape = m.measure(tensor)  # length, kv_layout (and d) of the imported tensor
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
        base, shape["length"],
        **_task_fields(stored, task, template, labels, verbalizer),
        name=name if name is not None else (stored.name if stored else None),
        training=dict(stored.training) if stored else {},
        extra=extra,
        method=m.name,
        kv_layout=shape["kv_layout"],
    )
    meta.dtype = stored.dtype if stored is not None and stored.dtype in STORAGE_DTYPES else src_dtype
    return LoadedPrompt(tensor, meta, None)


def _embeddings(read: Callable[[PeftAdapter, int, int], torch.Tensor]) -> Callable[[PeftAdapter, BaseModel], torch.Tensor]:
    """A (P, d) importer of peft_adapter.py, after checking the config's P and d against each other and the base."""
    return lambda adapter, base: read(adapter, *_check_shape_fields(adapter, base))


ADAPTER_READERS: dict[str, Callable[[PeftAdapter, BaseModel], torch.Tensor]] = {
    **{ptype: _embeddings(read) for ptype, read in IMPORTERS.items()}, **DEEP_IMPORTERS}
"""How each importable PEFT type's tensor is read for a base: (P, d) or (layers, 2, kv_heads, P, head_dim)
float32; the method it becomes is the registry's (``PromptMethod.peft_imports``)."""


def _read_prompt(adapter_dir: str | os.PathLike, base: BaseModel) -> tuple[PeftAdapter, torch.Tensor, PromptMethod]:
    """Read an adapter and its prompt for ``base``: ``(adapter, float32 tensor, its method)``."""
    config = read_adapter_config(adapter_dir)
    where = Path(adapter_dir) / CONFIG_NAME
    ptype = str(config.get("peft_type") or "")
    if not ptype:
        raise PromptFileError(f"{where}: no peft_type (not a PEFT adapter config)")
    m = method_for_peft(ptype)
    if m is None or ptype not in ADAPTER_READERS:
        reason = UNSUPPORTED_REASONS.get(ptype, "it prepends neither virtual tokens nor keys/values")
        known = [t for o in METHODS.values() for t in o.peft_imports]
        raise PromptFileError(
            f"{where}: PEFT type {ptype} is not supported ({reason}); softprompt imports "
            f"{', '.join(known[:-1])} and {known[-1]}"
        )
    adapter = read_adapter(adapter_dir, config)  # after the type check: a LoRA file may be large
    return adapter, ADAPTER_READERS[ptype](adapter, base), m


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
        from ..base import resolve_model

        name = resolve_model(None)[1]
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def _prompt_tuning(meta: PromptMeta, tensor: torch.Tensor, base_model_name: str | None,
                   model_config: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """An input prompt's PROMPT_TUNING config and tensor: (P, d) as it is."""
    if model_config is None:
        model_config = _local_model_config(meta.base_model)
    return peft_config_dict(meta, base_model_name=base_model_name, model_config=model_config), tensor


def _prefix_tuning(meta: PromptMeta, tensor: torch.Tensor, base_model_name: str | None,
                   model_config: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """A deep prompt's PREFIX_TUNING config and tensor: (layers, 2, kv_heads, P, head_dim) -> (P, layers * 2 * kv_heads * head_dim)."""
    return prefix_config_dict(meta, base_model_name or peft_base_name(meta.base_model)), to_peft(tensor)


ADAPTER_WRITERS: dict[str, Callable[[PromptMeta, torch.Tensor, str | None, Any], tuple[dict[str, Any], torch.Tensor]]] = {
    "PROMPT_TUNING": _prompt_tuning, PREFIX_TUNING: _prefix_tuning}
"""How a prompt becomes an adapter of each PEFT type a method exports as (``PromptMethod.peft_type``):
``(meta, float32 tensor, base_model_name, model config or None) -> (adapter_config, tensor)``."""


def _check_peft_type(meta: PromptMeta, peft_type: str | None, where: str) -> None:
    """Refuse, in one line, a PEFT type that cannot hold a prompt of this method."""
    m = method(meta.method, where, PromptFileError)
    if peft_type not in (None, m.peft_type):
        other = next((o for o in METHODS.values() if o.peft_type == peft_type and o is not m), None)
        what = f"{m.a} (method {m.name!r}) holds {m.holds}" + (f", not {other.holds}" if other else "")
        raise PromptFileError(f"{where}: {what}, so it cannot be a PEFT {peft_type} adapter; export it as {m.peft_type}")


def export_peft(
    prompt: str | os.PathLike | LoadedPrompt,
    out_dir: str | os.PathLike,
    *,
    base: BaseModel | None = None,
    base_model_name: str | None = None,
    model_config: Any = None,
    strict: bool = True,
    peft_type: str | None = None,
) -> Path:
    """Write a prompt as a PEFT adapter directory (``peft`` not needed): an input prompt as
    PROMPT_TUNING, a deep prompt as PREFIX_TUNING.

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
        peft_type: "PROMPT_TUNING" or "PREFIX_TUNING"; None: the prompt's own (its method's
            ``peft_type``); the other one is refused.
    Returns:
        The adapter directory.
    """
    loaded = prompt if isinstance(prompt, LoadedPrompt) else load_prompt(prompt)
    meta = loaded.meta
    where = str(loaded.path or "prompt")
    _check_peft_type(meta, peft_type, where)
    if tuple(loaded.tensor.shape) != tensor_shape(meta):
        raise PromptFileError(f"{where}: tensor shape {tuple(loaded.tensor.shape)} does not match its metadata")
    if base is not None:
        check_compatible(meta, base, where, strict=strict)
        model_config = base.model.config
    tensor = loaded.tensor.detach().to("cpu", torch.float32)  # exact for fp16/bf16 sources
    config, tensor = ADAPTER_WRITERS[METHODS[meta.method].peft_type](meta, tensor, base_model_name, model_config)
    tensor = tensor.contiguous()
    header = {"format": "pt", META_KEY: json.dumps(asdict(meta), sort_keys=True)}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PromptFileError(f"{out}: exists and is not a directory")
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors_bytes({PROMPT_KEY: tensor}, header))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out
