"""One scoring path for training, evaluation, prediction and serving.

- Rank classification: each label's full token sequence is scored as a continuation of the source
  (summed log-probability), so a prediction is always a valid label. The source runs once; its KV
  cache is expanded C times and only the label tokens run again.
- Generation: batched greedy or nucleus sampling with a KV cache, stop strings, EOS.

The serving engine builds :class:`SourceState` from precomputed prompt prefixes instead of
:func:`source_forward` and then calls the same :func:`label_logprobs`, :func:`sample_next` and
:func:`find_stop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .model import Prompts, PromptedModel, cache_layers, make_cache


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
    """
    B, C = state.mask.shape[0], len(label_ids)
    dev = state.last_hidden.device
    lab, lmask = right_pad(label_ids, pad_id(pm), dev)  # (C, Lmax)
    first = pm.project(state.last_hidden).float().log_softmax(-1)  # (B, V)
    scores = first[:, lab[:, 0]]  # (B, C): log p(first label token)
    if lab.shape[1] == 1:
        return scores
    # Continue every row with every label: expand the cache C times, run label tokens 0..L-2.
    layers = [(k.repeat_interleave(C, 0), v.repeat_interleave(C, 0)) for k, v in cache_layers(state.cache)]
    cont = lab[:, :-1].repeat(B, 1)  # (B·C, L-1): row b·C + c holds label c
    cont_mask = lmask[:, :-1].repeat(B, 1)  # (B·C, L-1)
    mask = torch.cat([state.mask.repeat_interleave(C, 0), cont_mask], 1)  # (B·C, L_src + L-1)
    pos = state.next_pos.repeat_interleave(C)[:, None] + torch.arange(cont.shape[1], device=dev)  # (B·C, L-1)
    hidden, _ = pm.decode(pm.embed(cont), mask, pos, past_key_values=make_cache(layers), use_cache=False)
    targets = lab[:, 1:].repeat(B, 1)  # (B·C, L-1)
    sel = lmask[:, 1:].repeat(B, 1).bool()  # (B·C, L-1): a real next token
    lp = pm.project(hidden[sel]).float().log_softmax(-1)  # (N, V)
    tok_lp = lp.gather(1, targets[sel][:, None])[:, 0]  # (N,)
    rows = sel.nonzero(as_tuple=True)[0]  # (N,)
    rest = torch.zeros(B * C, device=dev, dtype=tok_lp.dtype).index_add(0, rows, tok_lp)  # (B·C,)
    return scores + rest.view(B, C)


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


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1 (pure)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


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
    eos = tok.eos_token_id
    B = state.mask.shape[0]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(B)] if seed is not None else None
    cache, mask, pos = state.cache, state.mask, state.next_pos
    logits = pm.project(state.last_hidden)  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done: list[str | None] = [None] * B
    texts = [""] * B
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gens)  # (B,)
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            if t == eos:
                done[i] = "eos"
                continue
            out[i].append(t)
            texts[i] = tok.decode(out[i], skip_special_tokens=True)
            if stop and find_stop(texts[i], stop) >= 0:
                done[i] = "stop"
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)  # (B, L + 1)
        hidden, cache = pm.decode(pm.embed(nxt[:, None]), mask, pos[:, None], past_key_values=cache, use_cache=True)
        pos = pos + 1
        logits = pm.project(hidden[:, -1])  # (B, V)
    result = []
    for i in range(B):
        text = texts[i]
        cut = find_stop(text, stop) if stop else -1
        if cut >= 0:
            text = text[:cut]
        result.append(Generation(text.strip(), out[i], done[i] or "length"))
    return result
