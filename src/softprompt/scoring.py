"""One scoring path for training, evaluation, prediction and serving.

- Rank classification: each label's full token sequence is scored as a continuation of the source
  (summed log-probability), so a prediction is always a valid label. The source runs once; the
  labels' tokens run after it as branches of one tree that shares its KV cache.
- Generation: batched greedy or nucleus sampling with a KV cache, stop strings, EOS.

The serving engine builds :class:`SourceState` from precomputed prompt prefixes instead of
:func:`source_forward` and then calls the same :func:`label_logprobs` and :func:`sample_next`; every
generation path turns tokens into text with :class:`~softprompt.textgen.TextStepper`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

import torch.nn.functional as F

from .hf_compat import position_window
from .model import Prompts, PromptedModel, cache_layers, make_cache, tree_masks
from .textgen import TextStepper


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids (B, T), mask (B, T))`` (pure)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(ids (B, T), mask (B, T))`` (pure)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class SourceState:
    """The model state after reading each row's prompt + source (left-padded, so the last column
    is every row's last source token)."""

    cache: object  # HF cache over (B, H, L, hd) keys/values
    mask: torch.Tensor  # (B, L) attention mask of the cached positions
    last_hidden: torch.Tensor  # (B, d) final hidden state at the last source token
    next_pos: torch.Tensor  # (B,) position id of the next token

    def select(self, idx: Sequence[int]) -> "SourceState":
        """The rows ``idx`` (cache included), e.g. the rows that share one label set."""
        ix = torch.as_tensor(list(idx), dtype=torch.long, device=self.mask.device)
        layers = [(k.index_select(0, ix), v.index_select(0, ix)) for k, v in cache_layers(self.cache)]
        return SourceState(make_cache(layers), self.mask[ix], self.last_hidden[ix], self.next_pos[ix])


def pad_id(pm: PromptedModel) -> int:
    tok = pm.base.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def source_forward(pm: PromptedModel, prompts: Prompts, source_ids: Sequence[Sequence[int]]) -> SourceState:
    """Run prompts + sources once (uncached prompt path) and keep the KV cache."""
    ids, mask = left_pad(source_ids, pad_id(pm), pm.base.device)  # (B, T)
    packed = pm.pack(ids, mask, prompts)
    hidden, cache = pm.decode(packed.inputs_embeds, packed.attention_mask, packed.position_ids, use_cache=True)
    return SourceState(cache, packed.attention_mask, hidden[:, -1], packed.attention_mask.sum(1))


def label_logprobs(pm: PromptedModel, state: SourceState, label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Summed log p(label tokens | prompt, source) for every row and label, (B, C).

    Differentiable with respect to the prompt (training uses it as the classification loss).
    Every label's tokens after the first run as one branch of a tree that shares the source's
    key/value cache (:func:`label_tree`): memory grows with the labels' total length, not with
    labels x source length x layers.
    """
    dev = state.last_hidden.device
    first_ids = torch.tensor([l[0] for l in label_ids], device=dev)  # (C,)
    first = pm.project(state.last_hidden).float().log_softmax(-1)  # (B, V)
    scores = first[:, first_ids]  # (B, C): log p(first label token)
    tree = label_tree(label_ids, dev)
    if tree is None:  # every label is one token
        return scores
    ids, group, offset, targets = tree  # (Q,) each
    B, Q = scores.shape[0], ids.shape[0]
    pos = state.next_pos[:, None] + offset[None]  # (B, Q): a branch continues where the source ends
    valid = torch.cat([state.mask.bool(), torch.ones(B, Q, dtype=torch.bool, device=dev)], 1)  # (B, L_src + Q)
    src_pos = state.mask.long().cumsum(-1) - 1  # (B, L_src)
    key_pos = torch.cat([src_pos, pos], 1)  # (B, L_src + Q)
    key_group = torch.cat([torch.full((state.mask.shape[1],), -1, device=dev), group])  # (L_src + Q,)
    emb = pm.embed(ids[None]).expand(B, -1, -1)  # (B, Q, d)
    masks = tree_masks(valid, key_pos, key_group, pos, group, position_window(pm.config), emb.dtype)
    cache = make_cache(cache_layers(state.cache))  # a fresh cache object: decode appends to it, the source's stays
    hidden, _ = pm.decode(emb, valid.long(), pos, past_key_values=cache, use_cache=False, masks=masks)  # (B, Q, d)
    logits = pm.project(hidden).float()  # (B, Q, V)
    tok_lp = -F.cross_entropy(logits.flatten(0, 1), targets.repeat(B), reduction="none").view(B, Q)  # (B, Q)
    rest = torch.zeros_like(scores).index_add(1, group, tok_lp)  # (B, C)
    return scores + rest


def label_tree(label_ids: Sequence[Sequence[int]], device=None):
    """The label tokens that run after the source, as one packed sequence of branches (pure).

    Label c's tokens 0..L_c-2 form branch c: each predicts the label's next token. Returns
    ``(ids, group, offset, targets)``, each (Q,) with Q = sum(L_c - 1): the token fed, its branch,
    its offset after the source and the token it predicts; None when every label is one token.
    """
    feed = [(c, j, l[j], l[j + 1]) for c, l in enumerate(label_ids) for j in range(len(l) - 1)]
    if not feed:
        return None
    group, offset, ids, targets = (torch.tensor(col, dtype=torch.long, device=device) for col in zip(*feed))
    return ids, group, offset, targets


def classify_scores(
    pm: PromptedModel, prompts: Prompts, source_ids: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Rank-classification scores (summed label log-probs), (B, C). ``softmax(-1)`` gives class
    probabilities."""
    return label_logprobs(pm, source_forward(pm, prompts, source_ids), label_ids)


def sample_next(
    logits: torch.Tensor,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick the next token of each row, (B, V) -> (B,) (pure).

    Temperature 0 is greedy. Each row may have its own temperature, top-p and generator, so a
    row's tokens do not depend on which other rows share its batch.
    """
    B = logits.shape[0]
    temps = [temperature] * B if isinstance(temperature, (int, float)) else list(temperature)
    tops = [top_p] * B if isinstance(top_p, (int, float)) else list(top_p)
    gens = list(generators) if generators is not None else [None] * B
    out = logits.argmax(-1)  # (B,)
    for i in range(B):
        if temps[i] <= 0:
            continue
        probs = (logits[i].float() / temps[i]).softmax(-1)  # (V,)
        if tops[i] < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < tops[i]  # smallest set with mass >= top_p
            keep[0] = True  # the likeliest token always (a top_p below float32's range, e.g. 5e-324, keeps none)
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        g = gens[i]
        out[i] = torch.multinomial(probs.cpu(), 1, generator=g)[0]
    return out


@dataclass
class Generation:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"


@torch.no_grad()
def generate(
    pm: PromptedModel,
    prompts: Prompts,
    source_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[Generation]:
    """Batched generation with a KV cache; finished rows stop contributing (uncached-prompt path).

    With ``seed`` each row gets its own generator seeded ``seed + row``.
    """
    return generate_after(pm, source_forward(pm, prompts, source_ids), max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, stop=stop, seed=seed)


@torch.no_grad()
def generate_after(
    pm: PromptedModel,
    state: SourceState,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[Generation]:
    """:func:`generate` continuing from a state already read (e.g. after a deep prompt's prefix)."""
    tok = pm.base.tokenizer
    B = state.mask.shape[0]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(B)] if seed is not None else None
    cache, mask, pos = state.cache, state.mask, state.next_pos
    logits = pm.project(state.last_hidden)  # (B, V)
    rows = [TextStepper.for_tokenizer(tok, max_new_tokens, stop) for _ in range(B)]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gens)  # (B,)
        for i, row in enumerate(rows):
            if row.reason is None:
                row.push(int(nxt[i]))
        if all(row.reason for row in rows):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)  # (B, L + 1)
        hidden, cache = pm.decode(pm.embed(nxt[:, None]), mask, pos[:, None], past_key_values=cache, use_cache=True)
        pos = pos + 1
        logits = pm.project(hidden[:, -1])  # (B, V)
    return [Generation(row.final, row.out, row.reason or "length") for row in rows]
