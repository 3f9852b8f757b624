"""The client side of ``prompt_embeds``: the base model's embedding table and the wire encoding.

vLLM's ``/v1/completions`` takes ``prompt_embeds`` as base64 of the bytes ``torch.save`` writes for
a (L, d) floating-point tensor (vllm/renderers/embed_utils.py: ``torch.load(BytesIO(b64decode(x)),
weights_only=True)``; the server casts it to its own dtype). A request's input is
``[prompt (P, d) ; E[token ids] (T, d)]``, the same layout our engine packs for one row.

Only the embedding matrix is read from the checkpoint (one tensor of its safetensors files), so a
client next to a large base does not hold the model a second time.

Not here: HTTP (client.py), how classification is split into requests (labels.py).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..base import embedding_fingerprint, load_base_model, resolve_model
from ..errors import ModelLoadError


def encode_embeds(embeds: torch.Tensor) -> str:
    """A (L, d) float tensor -> the base64 string vLLM's ``prompt_embeds`` field takes."""
    if embeds.dim() != 2 or not embeds.is_floating_point():
        raise ValueError(f"prompt_embeds must be a (L, d) float tensor, got {tuple(embeds.shape)} {embeds.dtype}")
    buf = io.BytesIO()
    # clone(): torch.save writes a view's whole storage; a slice of the table would send all of it.
    torch.save(embeds.detach().to("cpu").clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_embeds(data: str) -> torch.Tensor:
    """Inverse of :func:`encode_embeds` (as the server reads it: weights only, no code runs)."""
    return torch.load(io.BytesIO(base64.b64decode(data, validate=True)), weights_only=True, map_location="cpu")


def _checkpoint_files(source: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint (a local folder, or a hub id via its cache)."""
    folder = Path(source)
    if folder.is_dir():
        def fetch(name: str) -> Path | None:
            return folder / name if (folder / name).is_file() else None
    else:
        from huggingface_hub import hf_hub_download

        def fetch(name: str) -> Path | None:
            try:
                return Path(hf_hub_download(source, name))
            except Exception:  # missing file or unreachable hub: tried in turn below
                return None
    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: index.parent / f for k, f in weight_map.items()}
    single = fetch("model.safetensors")
    if single is None:
        raise ModelLoadError(f"{source}: no model.safetensors or model.safetensors.index.json to read the embeddings from")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


@dataclass
class EmbeddingTable:
    """A base model's tokenizer and input-embedding matrix: all a client needs to build requests."""

    weight: torch.Tensor
    """(V, d) input-embedding matrix, as stored in the checkpoint."""
    tokenizer: object
    name: str
    """The base model's name as prompt files record it."""
    source: str
    """Where it was read from (the folder a ``vllm serve`` should load too)."""
    scale: float = 1.0
    """Factor the model's embedding module applies to looked-up rows (Gemma: sqrt(d)); 1 for most."""
    fingerprint: str = ""
    sketch: list[float] = field(default_factory=list)
    kv_layout: tuple[int, int, int] | None = None
    """(layers, kv_heads, head_dim) from the model's config, so a deep prompt for another model is
    named as such; None when unknown (a deep prompt is refused by the vLLM backend either way)."""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint, self.sketch = embedding_fingerprint(self.weight)

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        """Where a front end that holds only this table keeps prompts (the prompt bank reads it)."""
        return torch.device("cpu")

    @classmethod
    def load(cls, name_or_path: str | None = None) -> "EmbeddingTable":
        """Read the tokenizer and only the embedding tensor of a checkpoint (None: the default model).

        The tensor's name comes from a meta-device skeleton of the model (no weights in memory), so
        any architecture transformers knows works without a table of names.
        """
        name, source = resolve_model(name_or_path)
        skeleton = load_base_model(name_or_path, empty=True)  # config + tokenizer, parameters on meta
        module = skeleton.model.get_input_embeddings()
        keys = [n for n, p in skeleton.model.named_parameters(remove_duplicate=False) if p is module.weight]
        files = _checkpoint_files(source)
        key = next((k for k in keys if k in files), None)
        if key is None:
            raise ModelLoadError(f"{source}: none of {keys} is in its safetensors files")
        from safetensors import safe_open

        with safe_open(str(files[key]), "pt") as f:
            weight = f.get_tensor(key)  # (V, d): reads this one tensor only
        # Quirk: Gemma-style scaled embedding modules multiply looked-up rows (not inputs_embeds).
        scale = float(getattr(module, "embed_scale", 1.0))
        return cls(weight=weight, tokenizer=skeleton.tokenizer, name=name, source=source, scale=scale,
                   kv_layout=skeleton.kv_layout)

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Embeddings of token ids as the model's own embedding module gives them, (T,) -> (T, d) float32."""
        ix = torch.as_tensor(list(ids), dtype=torch.long)  # (T,)
        if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}")
        rows = self.weight.index_select(0, ix).float()  # (T, d)
        return rows * self.scale if self.scale != 1.0 else rows


def request_embeds(prompt: torch.Tensor | None, table: EmbeddingTable, ids: Sequence[int]) -> torch.Tensor:
    """One request's input: ``[prompt (P, d) ; E[ids] (T, d)]`` -> (P + T, d) float32.

    ``prompt`` None sends the bare tokens' embeddings (what a plain token request would run).
    """
    tokens = table.embed(ids)  # (T, d)
    if prompt is None:
        return tokens
    if prompt.dim() != 2 or prompt.shape[1] != table.dim:
        raise ValueError(f"prompt must be (P, {table.dim}), got {tuple(prompt.shape)}")
    return torch.cat([prompt.detach().to("cpu", torch.float32), tokens], 0)  # (P + T, d)
