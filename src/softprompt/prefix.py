"""The prompt as a key/value prefix: the one module where a soft prompt becomes per-layer keys and
values that sources are read after, for training and for serving.

A causal decoder's keys/values at prompt positions do not depend on what follows, so a prompt can
run through the model once and every row of its task reads its source after that prefix. Rows of a
batch may carry prompts of different lengths; they are right-aligned behind a masked gap
(Pmax = the longest prefix in the batch):

    [ gap (Pmax - P_i, masked) | prefix_i KV (P_i) | pad (masked) | source_i | ... ]

Position ids are ``cumsum(mask) - 1``, so row i's source continues at position P_i whatever the gap.

- training: :func:`prefix_forward` runs each distinct prompt of a batch once, differentiably, and
  gives every row its task's copy (gradients flow back through it); a deep prompt (trainable.py) is its
  own keys/values and needs no pass;
- scoring one prompt (eval, predict, dev evaluation): :func:`source_state` reads sources after a
  deep prompt's prefix, or packs an input prompt before them;
- serving: :meth:`PrefixKV.compute` runs a prompt once when it is loaded; :func:`stack_prefixes`
  lays out the cached prefixes of a batch (pure);
- both: :func:`read_after` / :func:`prefill` read the rows' sources after their prefixes.

Not here: the packed [prompt | text] path that runs prompt and text together (model.py ``pack``),
label scoring after a source (scoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import PromptedModel, cache_layers, make_cache, pack
from .scoring import SourceState, left_pad, pad_id, source_forward

KV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values)."""


@dataclass(frozen=True)
class PrefixKV:
    """One prompt's precomputed key/value prefix: per layer (keys, values), each (H, P, hd).

    ``layers`` is empty for the bare model (no prompt, P = 0).
    """

    layers: tuple[KV, ...]
    length: int

    @classmethod
    def empty(cls) -> "PrefixKV":
        return cls((), 0)

    @classmethod
    def compute(cls, pm: PromptedModel, prompt: torch.Tensor) -> "PrefixKV":
        """Run a prompt (P, d) through the model once (no gradient); keep its per-layer keys/values."""
        cache = pm.prefix_cache(prompt)
        layers = tuple((k[0].contiguous(), v[0].contiguous()) for k, v in cache_layers(cache))  # (H, P, hd) each
        return cls(layers, int(prompt.shape[0]))

    @classmethod
    def from_deep(cls, kv: torch.Tensor) -> "PrefixKV":
        """A deep prompt's prefix as it is stored: ``kv`` (layers, 2, kv_heads, P, head_dim) holds
        every layer's keys ([:, 0]) and values ([:, 1]) already; nothing runs through the model."""
        layers = tuple((kv[i, 0].contiguous(), kv[i, 1].contiguous()) for i in range(kv.shape[0]))  # (H, P, hd)
        return cls(layers, int(kv.shape[3]))


@dataclass
class Prefix:
    """The prefixes of a batch's rows: per layer (keys, values) (B, H, Pmax, hd), right-aligned,
    and their mask (B, Pmax), 0 on the gap. ``layers`` is empty when Pmax == 0."""

    layers: list[KV]
    mask: torch.Tensor

    @property
    def width(self) -> int:
        """Pmax."""
        return self.mask.shape[1]


def stack_prefixes(prefixes: Sequence[PrefixKV]) -> tuple[list[KV], torch.Tensor]:
    """Batch per-prompt prefixes, right-aligned behind a masked gap (pure).

    Args:
        prefixes: one per row; lengths may differ, zero-length (bare model) allowed.
    Returns:
        ``(layers, mask)``: per layer (keys (B, H, Pmax, hd), values (B, H, Pmax, hd)) and the
        prefix attention mask (B, Pmax), 0 on the gap. ``layers`` is empty when Pmax == 0.
    """
    Pmax = max((p.length for p in prefixes), default=0)
    lengths = torch.tensor([p.length for p in prefixes])
    mask = (torch.arange(Pmax)[None, :] >= (Pmax - lengths)[:, None]).long()  # (B, Pmax)
    if Pmax == 0:
        return [], mask
    like = next(p for p in prefixes if p.length > 0)
    layers = []
    for li, (k0, v0) in enumerate(like.layers):
        H, _, hd = k0.shape
        keys, values = [], []
        for p in prefixes:
            if p.length == 0:
                keys.append(k0.new_zeros(H, Pmax, hd))
                values.append(v0.new_zeros(H, Pmax, v0.shape[-1]))
            else:
                k, v = p.layers[li]  # (H, P_i, hd)
                keys.append(F.pad(k, (0, 0, Pmax - p.length, 0)))  # (H, Pmax, hd), zeros in the gap
                values.append(F.pad(v, (0, 0, Pmax - p.length, 0)))
        layers.append((torch.stack(keys), torch.stack(values)))  # (B, H, Pmax, hd) each
    if mask.device != like.layers[0][0].device:
        mask = mask.to(like.layers[0][0].device)
    return layers, mask


def is_deep(prompt: torch.Tensor) -> bool:
    """A deep prompt (layers, 2, kv_heads, P, head_dim), not an input prompt (P, d)."""
    return prompt.dim() == 5


def kv_dtype(pm: PromptedModel) -> torch.dtype:
    """The dtype a deep prompt's keys/values enter the model in: float32 under autocast (the
    model's own keys and values may differ there, e.g. fp32 keys after rotary and bf16 values;
    attention's matmuls cast both sides to the autocast dtype), else the weights' dtype."""
    return torch.float32 if torch.is_autocast_enabled(pm.base.device.type) else pm.lm.dtype


def _run_prompts(pm: PromptedModel, prompts: Sequence[torch.Tensor]) -> tuple[list[KV], torch.Tensor]:
    """Run input prompts (P_u, d) through the model once, right-aligned: per layer (U, H, Pmax, hd), mask (U, Pmax)."""
    dev, d = pm.base.device, pm.base.dim
    dt = pm.embed(torch.zeros(1, 1, dtype=torch.long, device=dev)).dtype
    empty = torch.zeros(len(prompts), 0, d, device=dev, dtype=dt)
    packed = pack(empty, torch.zeros(len(prompts), 0, dtype=torch.long, device=dev), list(prompts))
    _, cache = pm.decode(packed.inputs_embeds, packed.attention_mask, packed.position_ids, use_cache=True)
    return cache_layers(cache), packed.attention_mask


def prefix_forward(pm: PromptedModel, prompts: Sequence[torch.Tensor], tasks: Sequence[int]) -> Prefix:
    """Give every row its task's prompt keys/values (differentiable: the training pass).

    An input prompt (P, d) runs through the model once per batch, whatever the number of its rows
    (equals the packed [prompt | text] forward with B/U times less work on prompt positions); a deep
    prompt (layers, 2, H, P, hd) *is* its keys/values, no model pass. Both kinds mix in one batch.
    """
    uniq = sorted(set(tasks))
    dev = pm.base.device
    idx = torch.tensor([uniq.index(t) for t in tasks], dtype=torch.long, device=dev)  # (B,) row -> its prompt
    shallow = [t for t in uniq if not is_deep(prompts[t])]
    parts: dict[int, PrefixKV] = {}
    if shallow:
        layers, mask = _run_prompts(pm, [prompts[t] for t in shallow])  # (U_in, H, Pmax, hd), (U_in, Pmax)
        if len(shallow) == len(uniq):  # input prompts only: their rows index the packed cache directly
            return Prefix([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers], mask.index_select(0, idx))
        for j, t in enumerate(shallow):
            P = prompts[t].shape[0]  # right-aligned: the last P positions are this prompt's
            parts[t] = PrefixKV(tuple((k[j, :, -P:], v[j, :, -P:]) for k, v in layers), P)
    for t in uniq:
        if is_deep(prompts[t]):
            parts[t] = PrefixKV.from_deep(prompts[t].to(dev, kv_dtype(pm)))
    layers, mask = stack_prefixes([parts[t] for t in uniq])  # (U, H, Pmax, hd), (U, Pmax)
    return Prefix([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers], mask.index_select(0, idx))


def source_positions(prefix_mask: torch.Tensor, source_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids for sources read after prefixes (pure).

    Args:
        prefix_mask: (B, Pmax), from :func:`stack_prefixes` / :func:`prefix_forward`.
        source_mask: (B, T), padded sources.
    Returns:
        ``(mask (B, Pmax + T), position_ids (B, T))``; row i's first source token sits at P_i.
    """
    mask = torch.cat([prefix_mask.to(source_mask), source_mask], 1)  # (B, Pmax + T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_mask.shape[1]:]  # (B, T)
    return mask, pos


def read_after(pm: PromptedModel, prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor):
    """Decode tokens ``ids`` (B, T) after the rows' prefixes.

    Returns:
        ``(hidden (B, T, d), cache over prefix + tokens, mask (B, Pmax + T))``.
    """
    full, pos = source_positions(prefix.mask, mask)  # (B, Pmax + T), (B, T)
    cache = make_cache(prefix.layers) if prefix.layers else None
    hidden, cache = pm.decode(pm.embed(ids), full, pos, past_key_values=cache, use_cache=True)
    return hidden, cache, full


def prefill(pm: PromptedModel, prefix: Prefix, sources: Sequence[Sequence[int]]) -> SourceState:
    """Read each row's source (left-padded) after its prefix: the state label scoring and
    generation continue from (last_hidden (B, d), next_pos (B,))."""
    ids, smask = left_pad(sources, pad_id(pm), pm.base.device)  # (B, T)
    hidden, cache, full = read_after(pm, prefix, ids, smask)
    return SourceState(cache, full, hidden[:, -1], full.sum(1))


def source_state(pm: PromptedModel, prompt: torch.Tensor, sources: Sequence[Sequence[int]]) -> SourceState:
    """Read every source after one prompt, the state label scoring and generation continue from:
    a deep prompt through its prefix (it has no input embeddings), an input prompt (P, d) (or a
    zero-length one: the bare model) packed before the sources as everywhere else."""
    if is_deep(prompt):
        return prefill(pm, prefix_forward(pm, [prompt], [0] * len(sources)), sources)
    return source_forward(pm, prompt, sources)
