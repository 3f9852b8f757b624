"""What the task kinds share: length-sorted batches, the bare model's empty prompt, a prompt per
row for the packed training path, and cutting a text to a token budget (pure helpers).

Not here: anything one kind does alone (``classify.py``, ``generate.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches over items sorted by length (less padding); pure."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def row_prompts(prompt: torch.Tensor | None, dim: int, device, dtype) -> torch.Tensor:
    """``prompt``, or for the bare model (None) a zero-length prompt (0, d)."""
    if prompt is None:  # the bare model: a zero-length prompt
        return torch.zeros(0, dim, device=device, dtype=dtype)
    return prompt


def prompts_for(prompts: Sequence[torch.Tensor], tasks: Sequence[int]):
    """One shared (P, d) tensor when all rows are of one task, else a per-row list."""
    if len(set(tasks)) == 1:
        return prompts[tasks[0]]
    return [prompts[t] for t in tasks]


def cut_tokens(tokenizer, text: str, n: int) -> str:
    """The longest prefix of ``text`` of at most ``n`` tokens (whole text when it fits)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n:
        return text
    for m in range(max(0, n), -1, -1):  # re-tokenizing a decoded cut can grow by a token
        cut = tokenizer.decode(ids[:m])
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n:
            return cut
    return ""
