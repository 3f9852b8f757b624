"""Prefill of missing prompt prefixes, batched: a prompt read on first use carries a
:class:`PrefixSlot` that is empty until the worker thread fills it; when a step's rows need
several empty slots, their prompts run through the model together, one forward pass per prompt
length (prompts of one base usually share P; grouping by length needs no padding, so each
prompt's keys/values are what a pass of its own gives, up to the order of float sums).

Not here: when it runs (the scheduler calls the bank's ``fill`` before a step), the cache of
entries (bank.py), the prefix layout (prefix.py).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from ..model import PromptedModel, cache_layers
from ..prefix import PrefixKV


class PrefixSlot:
    """One prompt's key/value prefix, computed at most once. Filled at creation (a deep prompt's
    stored keys/values, an explicit load, the vLLM backend's rows) or later by :func:`fill_slots`
    on the worker thread; once filled it never changes, so every request that holds it reads the
    same prefix, whatever happens to the cache meanwhile."""

    def __init__(self, length: int, prompt: torch.Tensor | None = None, value: PrefixKV | None = None):
        self.length = length
        """P, known before the prefix is computed (admission bounds requests with it)."""
        self.prompt = prompt
        """(P, d) input prompt to compute the prefix from, dropped once filled."""
        self._value = value
        self._lock = threading.Lock()
        self.spill_key: str | None = None
        """Set when the prefix is to be written to the spill once computed (prefix_spill.py)."""

    @property
    def filled(self) -> bool:
        return self._value is not None

    def get(self) -> PrefixKV:
        """The prefix; raises RuntimeError while it is not computed yet."""
        if self._value is None:
            raise RuntimeError("the prompt's prefix is not computed yet (the worker fills it before its first step)")
        return self._value

    def fill(self, value: PrefixKV) -> None:
        """Set the prefix; the first fill wins (a slot never changes once filled)."""
        with self._lock:
            if self._value is None:
                self._value = value
                self.prompt = None


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by equal length, groups in order of first appearance (pure)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return list(groups.values())


@torch.no_grad()
def compute_prefixes(pm: PromptedModel, prompts: Sequence[torch.Tensor]) -> list[PrefixKV]:
    """The key/value prefixes of input prompts (P_u, d), one forward pass per distinct length.

    Equals ``[PrefixKV.compute(pm, p) for p in prompts]`` (the same positions 0..P-1, full mask,
    no padding), with U prompts of a length sharing one pass."""
    out: list[PrefixKV | None] = [None] * len(prompts)
    dev = pm.base.device
    for idx in length_groups([int(p.shape[0]) for p in prompts]):
        P = int(prompts[idx[0]].shape[0])
        emb = torch.stack([prompts[i].to(dev, pm.lm.dtype) for i in idx])  # (U, P, d)
        mask = torch.ones(len(idx), P, dtype=torch.long, device=dev)  # (U, P)
        pos = torch.arange(P, device=dev)[None].expand(len(idx), P)  # (U, P)
        _, cache = pm.decode(emb, mask, pos, use_cache=True)
        layers = cache_layers(cache)  # per layer (U, H, P, hd) x 2
        for j, i in enumerate(idx):
            out[i] = PrefixKV(tuple((k[j].contiguous(), v[j].contiguous()) for k, v in layers), P)  # (H, P, hd)
    return out  # type: ignore[return-value]


def fill_slots(pm: PromptedModel, slots: Sequence[PrefixSlot]) -> int:
    """Fill the empty slots among ``slots`` (each distinct slot once) in batched passes; returns
    how many were computed. The caller holds the model lock."""
    todo = list({id(s): s for s in slots if not s.filled}.values())
    if not todo:
        return 0
    for slot, prefix in zip(todo, compute_prefixes(pm, [s.prompt for s in todo])):
        slot.fill(prefix)
    return len(todo)
