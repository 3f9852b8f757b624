"""The soft prompt: P trainable virtual-token embeddings, and the registry of ways to initialise them.

Not here: how a prompt is injected into a model (model.py) or stored on disk (artifact/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

VOCAB_POOL = 5000
"""``vocab`` init samples from the first 5000 non-special ids (Lester et al. sample from the 5000
most common tokens; BPE vocabularies are ordered roughly by frequency)."""


class SoftPrompt(nn.Module):
    """P virtual-token embeddings of width d, kept in float32 (the master copy under autocast)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1:
            raise ConfigError(f"a soft prompt needs a (P, d) tensor with P >= 1, got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())  # (P, d)

    @property
    def length(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        """Returns the prompt embeddings, shape (P, d)."""
        return self.weight

    @classmethod
    def initialize(
        cls,
        embedding: nn.Module,
        tokenizer,
        length: int,
        strategy: str = "vocab",
        *,
        text: str | None = None,
        labels: Sequence[str] | None = None,
        seed: int = 0,
    ) -> "SoftPrompt":
        """Create a prompt of ``length`` tokens with an init strategy from :data:`INIT_STRATEGIES`.

        Args:
            embedding: the base model's input embedding module (``get_input_embeddings()``).
            tokenizer: the base model's tokenizer.
            length: P, the number of virtual tokens.
            strategy: "random", "vocab", "text" or "labels".
            text: the text for ``text`` init.
            labels: the label words for ``labels`` init.
            seed: seeds every random choice.
        """
        if length < 1:
            raise ConfigError(f"--prompt-length must be at least 1, got {length}")
        if strategy not in INIT_STRATEGIES:
            raise ConfigError(f"unknown --init {strategy!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        ctx = InitContext(embedding, tokenizer, length, text, list(labels or []), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            weight = INIT_STRATEGIES[strategy](ctx)  # (P, d)
        assert weight.shape[0] == length, (strategy, weight.shape)
        return cls(weight)


@dataclass
class InitContext:
    """Everything an init strategy may use."""

    embedding: nn.Module
    tokenizer: object
    length: int
    text: str | None
    labels: list[str] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Embeddings of token ids through the embedding *module* (so models that scale inside
        their embedding layer, e.g. Gemma 3, get prompts on the same scale as real tokens)."""
        w = self.embedding.weight
        out = self.embedding(torch.tensor(list(ids), dtype=torch.long, device=w.device))  # (n, d)
        return out.detach().to("cpu", torch.float32)

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def vocab_pool(self) -> torch.Tensor:
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        V = self.embedding.weight.shape[0]
        pool = [i for i in range(min(V, VOCAB_POOL + len(special))) if i not in special][:VOCAB_POOL]
        return torch.tensor(pool, dtype=torch.long)


def init_random(ctx: InitContext) -> torch.Tensor:
    """Gaussian with the per-dimension mean and std of (a sample of) the real token embeddings."""
    V = ctx.embedding.weight.shape[0]
    ids = torch.randperm(V, generator=ctx.generator)[: min(V, 4096)]
    ref = ctx.embed(ids.tolist())  # (n, d)
    mean, std = ref.mean(0), ref.std(0)  # (d,), (d,)
    noise = torch.randn(ctx.length, ref.shape[1], generator=ctx.generator)  # (P, d)
    return mean + noise * std


def init_vocab(ctx: InitContext) -> torch.Tensor:
    """Embeddings of P tokens sampled (without replacement where possible) from common tokens."""
    pool = ctx.vocab_pool()
    if len(ctx.tokenizer) == 0 or len(pool) == 0:
        raise ConfigError("--init vocab: the tokenizer has no non-special tokens")
    perm = torch.randperm(len(pool), generator=ctx.generator)
    picks = perm.repeat((ctx.length + len(pool) - 1) // len(pool))[: ctx.length]
    return ctx.embed(pool[picks].tolist())


def init_text(ctx: InitContext) -> torch.Tensor:
    """Embeddings of the tokens of ``text``, tiled or cut to P."""
    if not ctx.text or not ctx.text.strip():
        raise ConfigError("--init text needs a non-empty --init-text")
    ids = ctx.tokens(ctx.text)
    if not ids:
        raise ConfigError("--init-text tokenizes to no tokens")
    reps = (ctx.length + len(ids) - 1) // len(ids)
    return ctx.embed((ids * reps)[: ctx.length])


def init_labels(ctx: InitContext) -> torch.Tensor:
    """Lester et al.: one slot per class label (multi-token labels averaged), the rest from vocab."""
    if not ctx.labels:
        raise ConfigError("--init labels needs the label words (a classification task)")
    rows = []
    for label in ctx.labels[: ctx.length]:
        ids = ctx.tokens(" " + label.strip()) or ctx.tokens(label)
        if not ids:
            raise ConfigError(f"--init labels: label {label!r} tokenizes to no tokens")
        rows.append(ctx.embed(ids).mean(0))  # (d,)
    head = torch.stack(rows)  # (C, d)
    rest = ctx.length - len(rows)
    if rest == 0:
        return head
    tail = init_vocab(InitContext(ctx.embedding, ctx.tokenizer, rest, None, [], ctx.generator))
    return torch.cat([head, tail])  # (P, d)


INIT_STRATEGIES: dict[str, Callable[[InitContext], torch.Tensor]] = {
    "random": init_random,
    "vocab": init_vocab,
    "text": init_text,
    "labels": init_labels,
}
"""Init strategies by name; each returns a (P, d) float32 tensor."""
