"""A least-recently-used map bounded in bytes: the prompt store keeps each resident prompt's
entry (tensor + key/value prefix) here, so memory stays bounded however many prompt files the
folder holds; and the default size of that bound (``--prefix-cache-mb``).

Not here: reading files or computing prefixes (bank.py, store.py, prefill.py). Not thread-safe:
the bank holds its lock around every call.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

V = TypeVar("V")
MB = 1 << 20
MIN_DEFAULT = 64 * MB
"""The default limit is never below this (room for ~70 prefixes of the default model in float32)."""


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by ``tensors`` (their storages, counted once each: views of one tensor share it)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free now where prefixes live: the GPU's free memory, else the host's available memory
    (Linux ``MemAvailable``, else free pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 32


def default_limit_bytes(weights: int, free: int) -> int:
    """``--prefix-cache-mb``'s default (pure): as many bytes of prefixes as the model's own weights,
    but at most a quarter of the memory free at start-up, and at least 64 MB.

    The weights are a natural yardstick: a server that can hold the model once can hold as much
    again in prompts (SmolLM2-135M in float32: 513 MiB, ~555 prompts of 20 tokens), while the
    quarter of free memory keeps a small machine (or a GPU nearly filled by the model) from being
    overcommitted."""
    return max(MIN_DEFAULT, min(weights, free // 4))


def token_kv_bytes(pm, prefixer) -> int:
    """Bytes of one virtual token's key/value prefix (0 on the vLLM front end, which holds a
    prompt's rows only: ``prefixer`` set)."""
    if prefixer is not None or getattr(pm, "lm", None) is None:
        return 0
    layers, heads, head_dim = pm.base.kv_layout
    return layers * 2 * heads * head_dim * torch.empty((), dtype=pm.lm.dtype).element_size()


def model_bytes(pm) -> int:
    """Bytes of the weights this process holds (the vLLM front end: its embedding table)."""
    lm = getattr(pm, "lm", None)
    if lm is not None:
        return sum(t.numel() * t.element_size() for t in lm.parameters())
    weight = getattr(pm.base, "weight", None)
    return 0 if weight is None else weight.numel() * weight.element_size()


@dataclass
class CacheStats:
    """Counts shown at ``/metrics``."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ByteLRU(Generic[V]):
    """``key -> (value, nbytes)``; putting past ``limit`` bytes drops least recently used entries
    (never the one just put). ``pinned`` keys are never dropped (values that exist nowhere else,
    e.g. in-memory uploads)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be at least 1 byte")
        self.limit = limit
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.pinned: set[str] = set()
        self.bytes = 0
        self.pinned_bytes = 0
        self.stats = CacheStats()

    def get(self, key: str) -> V | None:
        """The value (marked most recently used) or None; counts a hit or a miss."""
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return item[0]

    def peek(self, key: str) -> V | None:
        """The value, or None; no count, no change of order."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: str, value: V, nbytes: int, *, pinned: bool = False) -> list[str]:
        """Add or replace; returns the keys dropped to stay within the limit."""
        self.pop(key)
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        if pinned:
            self.pinned.add(key)
            self.pinned_bytes += nbytes
        dropped = []
        for old in list(self._items):
            if self.bytes <= self.limit:
                break
            if old == key or old in self.pinned:
                continue
            self.pop(old)
            self.stats.evictions += 1
            dropped.append(old)
        return dropped

    def pop(self, key: str) -> V | None:
        """Remove ``key`` (not counted as an eviction); returns its value or None."""
        item = self._items.pop(key, None)
        if item is None:
            return None
        if key in self.pinned:
            self.pinned.discard(key)
            self.pinned_bytes -= item[1]
        self.bytes -= item[1]
        return item[0]

    def nbytes(self, key: str) -> int:
        """Bytes counted for ``key`` (0 when absent)."""
        item = self._items.get(key)
        return 0 if item is None else item[1]

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
