"""What a prompt method is: the :class:`PromptMethod` contract every entry of the registry fills.

A prompt method says where a trained prompt goes and how it is stored, moved and served. The code
that trains, saves, exports, imports, reports and serves prompts asks the method's entry instead
of comparing method names, so a new method is one entry (and its own module) in ``methods/``.

Not here: the registry (``methods/__init__.py``), the methods themselves (``input_prompt.py``,
``deep_prompt.py``), reparameterisations (trainable.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Meta = Any
"""A :class:`~softprompt.artifact.PromptMeta` (read by attribute: ``length``, ``dim``, ``kv_layout``,
``dtype``); not imported, as the artifact package itself asks this registry."""


@dataclass(frozen=True)
class PromptMethod:
    """One prompt method: its facts and the behaviour the rest of softprompt asks it for."""

    name: str
    """``--method`` and ``PromptMeta.method``: "prompt", "prefix"."""
    title: str
    """What people call it: "input prompt", "deep prompt"."""
    about: str
    """One line on what it is, with its papers (``softprompt inspect``, the docs)."""
    holds: str
    """What its tensor holds, in words: "input embeddings", "keys/values at every layer"."""
    report_note: str
    """Added after "P virtual tokens" where a report describes a run ("" for none)."""
    # --- the prompt file ---
    tensor_name: str
    """The safetensors tensor a prompt file of this method holds."""
    format_version: int
    """The prompt-file format it is written as: the oldest that holds it (so older readers read it)."""
    measure: Callable[[torch.Tensor], dict[str, Any]]
    """tensor -> the ``PromptMeta`` shape fields it gives (``length``, ...); raises ValueError, one
    line naming the shape it wants, for a tensor of another shape."""
    shape: Callable[[Meta], tuple[int, ...]]
    """metadata -> the tensor shape it says; raises ValueError when the metadata cannot say it."""
    base_mismatch: Callable[[Meta, Any], str | None]
    """(metadata, base model) -> why the prompt cannot run on that base beyond its width, or None."""
    shape_words: Callable[[Meta], str]
    """metadata -> its shape for people ("input prompt: 20 virtual tokens x 576 dims")."""
    report_shape: Callable[[Meta], str]
    """metadata -> its shape in the evaluation report's table."""
    # --- PEFT ---
    peft_type: str
    """The PEFT adapter type it exports as."""
    peft_imports: tuple[str, ...]
    """The PEFT adapter types that import as this method."""
    # --- training ---
    lr: float
    """Default ``--lr``, for the plain method (a ``--reparam`` may have its own)."""
    start: Callable[[Any, torch.Tensor], torch.Tensor] | None
    """(prompted model, input-prompt init (P, d)) -> the tensor training starts from; None: the init
    itself (then a trained file of it can also start a reparameterised run)."""
    trainable: Callable[[torch.Tensor, torch.device], nn.Module]
    """(start tensor, device) -> the plain trainable prompt (``forward()`` gives the tensor)."""
    shardable: bool
    """Trains with the base's layers sharded over processes (FSDP / DeepSpeed ZeRO-3)."""
    # --- serving ---
    serve: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]]
    """(prompted model, tensor) -> (the tensor as served, its stored key/value prefix
    :class:`~softprompt.prefix.PrefixKV`, or None: the model computes it from the tensor on first use)."""
    backends: tuple[str, ...]
    """The ``--backend`` values that can serve it, the first the one to suggest."""

    @property
    def a(self) -> str:
        """Its title with an article: "an input prompt", "a deep prompt"."""
        return ("an " if self.title[:1] in "aeiou" else "a ") + self.title
