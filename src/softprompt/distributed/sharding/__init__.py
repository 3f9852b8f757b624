"""Sharding the frozen base over processes: one interface (:class:`~.base.Sharder`), two engines.

- ``base.py``   settings, the runtime and sharder interfaces, shared helpers
- ``fsdp.py``   softprompt's own per-layer sharding (accelerate FSDP configs)
- ``zero3.py``  DeepSpeed ZeRO-3 partitioning (accelerate DeepSpeed configs; DeepSpeed imported only when used)
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import (Collective, Sharder, ShardingConfig, check_same_model, layer_modules, materialize,  # noqa: F401
                   receive)
from .fsdp import ShardedLayers
from .zero3 import Zero3Layers, zero_section  # noqa: F401
from ..batches import lockstep_micro_batches  # noqa: F401

SHARDERS: dict[str, Callable[..., Sharder]] = {"fsdp": ShardedLayers, "zero3": Zero3Layers}
"""``ShardingConfig.engine`` -> the class that shards the base (the :class:`Sharder` interface)."""


def shard_base(model: nn.Module, comm: Collective, config: ShardingConfig, **kw: Any) -> Sharder:
    """Shard ``model``'s layers in place with the engine ``config`` names (keywords as :class:`ShardedLayers`)."""
    return SHARDERS[config.engine](model, comm, config, **kw)


__all__ = ["Collective", "Sharder", "ShardingConfig", "ShardedLayers", "Zero3Layers", "SHARDERS", "shard_base",
           "lockstep_micro_batches", "materialize", "check_same_model", "receive", "layer_modules", "zero_section"]
