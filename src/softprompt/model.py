"""A frozen HF causal LM with soft prompts prepended to its input embeddings.

Layout of a packed row (B rows, T text positions, Pmax = longest prompt in the batch):

    [ gap (Pmax - P_i, masked) | prompt_i (P_i) | text tokens (T, may carry left or right padding) ]

Masked positions may sit anywhere: position ids are ``cumsum(mask) - 1``, so every row sees its
prompt at positions 0..P_i-1 and its text right after, whatever its padding. This is what lets one
batch mix prompts of different lengths (multi-task training, serving).

Not here: KV-prefix batching for serving (serve/), the training loop (train/loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import BaseModel, assert_frozen
from .hf_compat import cache_argument, layer_kinds, output_cache, position_window, sliding_window

IGNORE_INDEX = -100

Prompts = torch.Tensor | Sequence[torch.Tensor]
"""One (P, d) prompt for every row, a (B, P, d) tensor, or a list of B tensors (P_i, d)."""


@dataclass
class Packed:
    """Model inputs with prompts prepended."""

    inputs_embeds: torch.Tensor  # (B, Pmax + T, d)
    attention_mask: torch.Tensor  # (B, Pmax + T) long
    position_ids: torch.Tensor  # (B, Pmax + T) long
    labels: torch.Tensor | None  # (B, Pmax + T) long, IGNORE_INDEX on prompt and gap
    prompt_width: int  # Pmax


def _prompt_block(prompts: Prompts, B: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align each row's prompt in a (B, Pmax, d) block; returns (block, mask (B, Pmax))."""
    dev, dt = like.device, like.dtype
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0).expand(B, -1, -1)  # (B, P, d)
        if prompts.dim() != 3 or prompts.shape[0] != B:
            raise ValueError(f"prompts must be (P, d) or (B={B}, P, d), got {tuple(prompts.shape)}")
        mask = torch.ones(B, prompts.shape[1], dtype=torch.long, device=dev)
        return prompts.to(dev, dt), mask
    if len(prompts) != B:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {B} rows")
    lengths = [p.shape[0] for p in prompts]
    Pmax = max(lengths)
    # (B, Pmax, d): left-pad each prompt with zeros to Pmax
    block = torch.stack([F.pad(p.to(dev, dt), (0, 0, Pmax - p.shape[0], 0)) for p in prompts])
    idx = torch.arange(Pmax, device=dev)
    mask = (idx[None, :] >= (Pmax - torch.tensor(lengths, device=dev))[:, None]).long()  # (B, Pmax)
    return block, mask


def pack(
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: Prompts,
    labels: torch.Tensor | None = None,
) -> Packed:
    """Prepend prompts to token embeddings (pure function).

    Args:
        embeds: token embeddings, (B, T, d).
        attention_mask: (B, T), 1 on real tokens (left or right padding both fine).
        prompts: see :data:`Prompts`.
        labels: optional (B, T) target ids, IGNORE_INDEX where no loss is wanted.
    """
    B = embeds.shape[0]
    block, pmask = _prompt_block(prompts, B, embeds)  # (B, Pmax, d), (B, Pmax)
    inputs = torch.cat([block, embeds], dim=1)  # (B, Pmax + T, d)
    mask = torch.cat([pmask, attention_mask.to(pmask)], dim=1)  # (B, Pmax + T)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, Pmax + T)
    full_labels = None
    if labels is not None:
        pad = torch.full_like(pmask, IGNORE_INDEX)
        full_labels = torch.cat([pad, labels.to(pmask)], dim=1)  # (B, Pmax + T)
    return Packed(inputs, mask, position_ids, full_labels, block.shape[1])


def _apply_logit_quirks(config, logits: torch.Tensor) -> torch.Tensor:
    """Post-lm-head transforms some families apply inside their forward (quirks fenced here)."""
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logits_scaling", None)  # Granite
    if scale:
        logits = logits / scale
    return logits


def position_masks(attention_mask: torch.Tensor, position_ids: torch.Tensor, window: int | None,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive attention masks (B, 1, L, K) per layer type, by token position.

    HF builds a sliding-window mask from cache indices, which counts padding: with prompts and
    sources padded to a common length (a gap inside a row) a key can be inside the window by
    position and outside it by index. Here a query at position p sees the valid keys at positions
    p - window < q <= p (sliding layers) or q <= p (full layers); key positions are the running
    count of valid keys, as everywhere in softprompt. Every query also sees itself, so padded
    queries (whose outputs nobody reads) never get an empty row.

    Args:
        attention_mask: (B, K) 1 for valid keys, cached ones included; queries are the last L.
        position_ids: (B, L) positions of the queries.
        window: the sliding window (None: the sliding mask equals the full one).
    """
    key_pos = attention_mask.long().cumsum(-1) - 1  # (B, K)
    return tree_masks(attention_mask.bool(), key_pos, None, position_ids, None, window, dtype)


def tree_masks(valid: torch.Tensor, key_pos: torch.Tensor, key_group: torch.Tensor | None, query_pos: torch.Tensor,
               query_group: torch.Tensor | None, window: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive attention masks (B, 1, L, K) per layer type for queries that may sit on branches.

    A query at position p in group g sees the valid keys at positions <= p (and > p - window on
    sliding layers) whose group is -1 (the shared trunk, e.g. prompt + source) or g (its own
    branch, e.g. one label's earlier tokens). Groups None: one sequence (every key is the trunk).
    The queries are the last L keys; each sees itself.

    Args:
        valid: (B, K) bool, the keys that exist.
        key_pos: (B, K) position of each key. key_group: (K,) branch of each key, -1 for the trunk.
        query_pos: (B, L) position of each query. query_group: (L,) branch of each query.
    """
    K, L = valid.shape[1], query_pos.shape[1]
    dist = query_pos[:, :, None] - key_pos[:, None, :]  # (B, L, K)
    allowed = valid[:, None, :] & (dist >= 0)  # (B, L, K)
    if key_group is not None:
        same = (key_group[None, :] == -1) | (key_group[None, :] == query_group[:, None])  # (L, K)
        allowed = allowed & same[None]
    own = torch.zeros(L, K, dtype=torch.bool, device=valid.device)
    own[torch.arange(L), torch.arange(K - L, K)] = True  # (L, K): each query's own key
    lowest = torch.finfo(dtype).min
    add = lambda ok: torch.zeros(ok.shape, dtype=dtype, device=valid.device).masked_fill(
        ~(ok | own), lowest)[:, None]  # (B, 1, L, K)
    sliding = allowed if window is None else allowed & (dist < window)
    return {"full_attention": add(allowed), "sliding_attention": add(sliding)}


class PromptedModel(nn.Module):
    """A frozen causal LM that takes soft prompts; only prompts passed in receive gradients."""

    def __init__(self, base: BaseModel):
        super().__init__()
        self.base = base
        self.lm = base.model
        assert_frozen(self.lm)

    @property
    def config(self):
        return self.lm.config

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings through the model's own embedding module, (B, T) -> (B, T, d)."""
        return self.lm.get_input_embeddings()(input_ids)

    def pack(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: Prompts,
        labels: torch.Tensor | None = None,
    ) -> Packed:
        """Embed ``input_ids`` (B, T) and prepend ``prompts``; see :func:`pack`."""
        return pack(self.embed(input_ids), attention_mask, prompts, labels)

    def hidden_states(self, packed: Packed) -> torch.Tensor:
        """Final hidden states before the lm head, (B, Pmax + T, d)."""
        return self.decode(packed.inputs_embeds, packed.attention_mask, packed.position_ids)[0]

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
        masks: dict[str, torch.Tensor] | None = None,
    ):
        """Run the decoder (no lm head). Returns ``(hidden (B, L, d), cache or None)``.

        ``attention_mask`` covers the cached positions too: (B, past + L). ``masks``: additive
        (B, 1, L, past + L) masks per layer type (:func:`tree_masks`) that replace the causal mask
        built from ``attention_mask``, e.g. for label branches that share one source.
        """
        inner = self.lm.base_model
        window = position_window(self.config)
        if window is not None and masks is None:  # HF's sliding mask counts padding; ours counts positions
            masks = position_masks(attention_mask, position_ids, window, inputs_embeds.dtype)
        if masks is not None:
            if window is None:
                attention_mask = masks["full_attention"]
            else:
                per_layer = layer_kinds(self.config) is not None
                attention_mask = masks if per_layer else masks["sliding_attention"]  # one window for all layers
            if use_cache and past_key_values is None:
                past_key_values = make_cache([])  # full layers: the window is in the mask, not the cache
        kw = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids,
              cache_argument(inner): past_key_values, "use_cache": use_cache}
        if inner is self.lm:  # no separate decoder module: take it from the full forward
            out = self.lm(output_hidden_states=True, **kw)
            return out.hidden_states[-1], output_cache(out) if use_cache else None
        out = inner(**kw)
        return out.last_hidden_state, output_cache(out) if use_cache else None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm head (with family quirks) on any (..., d) hidden states -> (..., V) logits."""
        return _apply_logit_quirks(self.config, self.lm.get_output_embeddings()(hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: Prompts,
    ) -> torch.Tensor:
        """Full logits over every position, (B, Pmax + T, V). For inference and tests; training
        uses :meth:`target_logprobs`, which projects only the positions that carry loss."""
        packed = self.pack(input_ids, attention_mask, prompts)
        return self.project(self.hidden_states(packed))

    def target_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: Prompts,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the target tokens, computing the lm head only where labels are set.

        Args:
            labels: (B, T) target ids aligned with ``input_ids`` (the token to predict *at* that
                position, HF convention: it is predicted from the position before), IGNORE_INDEX
                elsewhere.
        Returns:
            ``(row_sums (B,), token_counts (B,))``: summed log p(target) per row and the number of
            target tokens per row. ``-(row_sums.sum() / token_counts.sum())`` is the usual loss.
        """
        packed = self.pack(input_ids, attention_mask, prompts, labels)
        return self.score_targets(self.hidden_states(packed), packed.labels)  # hidden (B, L, d)

    def score_targets(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log p(target) per row and target counts, from hidden states (B, L, d) and labels
        (B, L) aligned with them (IGNORE_INDEX elsewhere); the lm head runs only where a target is
        predicted. The one masked cross-entropy of softprompt (packed path and training's prefix path).
        """
        targets = labels[:, 1:]  # (B, L-1): position j predicts token j+1
        sel = targets != IGNORE_INDEX  # (B, L-1)
        rows = sel.nonzero(as_tuple=True)[0]  # (N,)
        h = hidden[:, :-1][sel]  # (N, d): only positions that predict a target
        logits = self.project(h).float()  # (N, V)
        tok_lp = -F.cross_entropy(logits, targets[sel], reduction="none")  # (N,)
        sums = torch.zeros(labels.shape[0], dtype=tok_lp.dtype, device=tok_lp.device).index_add(0, rows, tok_lp)
        return sums, sel.sum(1)  # (B,), (B,)

    @torch.no_grad()
    def prefix_cache(self, prompt: torch.Tensor):
        """Run one prompt (P, d) through the model once and return its KV cache (batch 1).

        In a causal decoder the prompt's keys/values at positions 0..P-1 do not depend on what
        follows, so serving computes them once per prompt.
        """
        emb = prompt.to(self.lm.device, self.lm.dtype)[None]  # (1, P, d)
        P = emb.shape[1]
        mask = torch.ones(1, P, dtype=torch.long, device=emb.device)
        return self.decode(emb, mask, torch.arange(P, device=emb.device)[None], use_cache=True)[1]


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key, value) tensors of every layer of an HF cache, each (B, H, L, hd)."""
    return [(layer[0], layer[1]) for layer in cache]


def make_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh HF ``DynamicCache`` holding the given per-layer (key, value) tensors."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])
