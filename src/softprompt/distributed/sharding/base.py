"""What every way of sharding the frozen base shares: its settings, what it needs from a runtime
(:class:`Collective`), the interface a sharder offers (:class:`Sharder`), and the helpers that
find the layers and hand process 0's weights to empty-weights processes.

Not here: softprompt's own per-layer sharding (fsdp.py), DeepSpeed ZeRO-3 (zero3.py), choosing
between them (``__init__.py``: ``SHARDERS``, :func:`shard_base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import torch
from torch import nn

from ...errors import ConfigError
from ...hf_compat import decoder_layer_names


@dataclass(frozen=True)
class ShardingConfig:
    """How to shard the frozen base (from an accelerate FSDP or DeepSpeed config;
    ``distributed.sharding_config``)."""

    layer_classes: tuple[str, ...] = ()
    """Class names of the modules sharded as one unit each (``fsdp_transformer_layer_cls_to_wrap``);
    empty: the model's decoder layers (its ``_no_split_modules``)."""

    engine: Literal["fsdp", "zero3"] = "fsdp"
    """Who shards: softprompt's own per-layer sharding (FSDP configs, :class:`ShardedLayers`) or
    DeepSpeed ZeRO-3's partitioning (DeepSpeed configs, ``zero3.Zero3Layers``)."""

    deepspeed: Mapping[str, Any] | None = None
    """The DeepSpeed config (its ``zero_optimization`` section is used), for ``engine="zero3"``."""

    efficient_loading: bool = False
    """``fsdp_cpu_ram_efficient_loading`` / DeepSpeed's ``zero3_init_flag``: only process 0 reads the
    checkpoint; the others build the model with empty (meta) weights and receive their shards and
    the replicated rest from it."""

    def describe(self) -> str:
        """How the base is sharded, for the training banner."""
        return "FSDP: base layers sharded" if self.engine == "fsdp" else "DeepSpeed ZeRO-3: base layers partitioned"


class Collective(Protocol):
    """What sharding needs from a runtime (distributed/runtime.py)."""

    rank: int
    world_size: int

    def all_gather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        """Write every process's ``shard`` (n,) into ``out`` (W * n,), in rank order."""
        ...

    def scatter(self, full: torch.Tensor | None, out: torch.Tensor) -> None:
        """Process 0's ``full`` (W * n,) cut into W slices; this process's slice into ``out`` (n,)."""
        ...

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with process 0's, in place."""
        ...

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order."""
        ...


class Sharder(Protocol):
    """What the training loop uses of a sharded base (fsdp.ShardedLayers, zero3.Zero3Layers).

    Constructed as ``cls(model, comm, config, device=..., compute_dtype=..., restore=...)``; used as
    a context manager around the loop (hooks active inside).
    """

    units: list
    """The sharded modules (one per decoder layer)."""
    full_bytes: int
    """Bytes of the sharded modules' weights, unsharded."""

    def __enter__(self) -> "Sharder": ...

    def __exit__(self, *exc: Any) -> None: ...

    def end_step(self) -> None:
        """Called by every process at the same points (after a step's backward, after evaluation)."""
        ...

    def local_bytes(self) -> int:
        """Bytes of weights this process holds."""
        ...

    def sharded_bytes(self) -> int:
        """Bytes of the sharded weights held per process."""
        ...


def materialize(module: nn.Module, fill: Callable[[nn.Parameter], torch.Tensor]) -> dict[int, nn.Parameter]:
    """Replace every meta parameter of ``module`` (an empty-weights load) by a frozen parameter
    holding ``fill(old)``; tied parameters stay one. Returns ``id(old) -> new``."""
    new: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(fill(p), requires_grad=False)
                m._parameters[name] = new[id(p)]
    return new


def check_same_model(model: nn.Module, comm: Collective, what: str) -> None:
    """Raise :class:`ConfigError` on every process unless all built the same parameters (names,
    shapes, dtypes): before process 0 sends its weights to empty-weights processes."""
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    if any(other != shapes for other in comm.gather(shapes)):
        raise ConfigError(f"{what}: the processes built different models (parameter names, shapes or dtypes "
                          "differ); check --model and --dtype")


def receive(module: nn.Module, comm: Collective, device: torch.device | None) -> None:
    """Give every process process 0's parameters and buffers of ``module`` (meta parameters of an
    empty-weights load become real first), one tensor at a time; empty placeholders are skipped."""
    materialize(module, lambda p: torch.empty(p.shape, dtype=p.dtype, device=device))
    for t in [*dict.fromkeys(module.parameters()), *module.buffers()]:
        if t.numel():
            t.data = t.data.to(device or t.device)
            comm.broadcast_tensor(t.data)


def layer_modules(model: nn.Module, classes: Sequence[str], engine: str = "FSDP") -> list[nn.Module]:
    """The modules of ``model`` sharded one unit each: those of the named classes, or its decoder
    layers (``_no_split_modules``); never one inside another."""
    names = set(classes) or decoder_layer_names(model)
    if not names:
        raise ConfigError(f"{engine}: this model names no decoder layer class (_no_split_modules)"
                          + ("; set fsdp_transformer_layer_cls_to_wrap in the accelerate config" if engine == "FSDP" else ""))
    found, inside = [], set()
    for m in model.modules():
        if type(m).__name__ in names and id(m) not in inside:
            found.append(m)
            inside.update(id(c) for c in m.modules())  # a unit is never nested in another
    if not found:
        raise ConfigError(f"{engine}: no module of class {', '.join(sorted(names))} in {type(model).__name__}"
                          + ("; check fsdp_transformer_layer_cls_to_wrap in the accelerate config" if classes else ""))
    return found
