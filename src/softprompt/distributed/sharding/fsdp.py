"""A fully sharded frozen base (what an accelerate FSDP config asks for): every process keeps 1/W
of each decoder layer's weights; a layer is all-gathered just before it runs and freed right after,
and the backward pass gathers it again when autograd needs its weights. One layer is gathered at a
time, into one buffer reused by every layer: a process holds its shards, the replicated rest and
one layer.

Only the base is sharded, and it is frozen: there are no base gradients to reduce-scatter and no
optimizer state to shard. The prompts stay replicated and their gradients are all-reduced by the
runtime (distributed/runtime.py), exactly as in data-parallel training. Embeddings, lm head, final norm and
buffers stay replicated: the prompt is initialised from the embedding matrix, prompt files
fingerprint it, and they are a small part of a large model.

How the backward pass finds the weights: an op saves a weight for the gradient of its input (a
Linear its weight, a norm its scale). While a layer is gathered its weights are views of one
buffer; a saved-tensor hook replaces every saved view of such a buffer by ``(layer, size, stride,
offset)`` and gathers the layer again when autograd unpacks it. That covers every use of a weight,
including rank classification's: the label pass reads the source pass's KV cache, so gradient
reaches the source pass's k/v projections through the cache and not through the layer's output.
torch's FSDP2 (``fully_shard`` per decoder layer) hooks layer outputs, and there the backward pass
found the k/v projection weights already freed (README, Distributed training).

Collectives must pair up across processes: every process must run the same sequence of layer
forwards. The training loop guarantees it with :func:`lockstep_micro_batches` (every process's
micro-batch holds a row of each task of the global micro-batch; borrowed rows carry no loss) and by
evaluating on every process.

Not here: what every sharder shares (base.py), reading the launch config (distributed/launch.py),
the loop (train/loop.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from .base import Collective, ShardingConfig, check_same_model, layer_modules, materialize, receive  # noqa: F401


class _Unit:
    """One sharded module: its parameters flattened into one buffer of which this process keeps
    its 1/W slice; while gathered, each parameter is a view of the gathered buffer."""

    def __init__(self, index: int, module: nn.Module, rank: int, world_size: int, device: torch.device,
                 compute: dict[int, torch.dtype], source: Collective | None = None):
        self.index, self.module = index, module
        params = list(dict.fromkeys(module.parameters()))  # tied parameters once
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ConfigError(f"FSDP: {type(module).__name__} holds parameters of several dtypes "
                              f"({', '.join(sorted(map(str, dtypes)))}); load the base with one --dtype")
        self.dtype = params[0].dtype
        self.slots: list[tuple[nn.Parameter, torch.Size, int, int, torch.dtype | None]] = []
        offset = 0
        for p in params:
            self.slots.append((p, p.shape, offset, p.numel(), compute.get(id(p))))
            offset += p.numel()
        self.numel = offset
        self.gathered_numel = math.ceil(offset / world_size) * world_size  # the flat layer, zero-padded to W slices
        per = self.gathered_numel // world_size
        lo, hi = rank * per, (rank + 1) * per
        self.shard = torch.zeros(per, dtype=self.dtype, device=device)  # (per,): this process's slice
        if source is not None:  # process 0 holds the weights and sends each process its slice
            full = None
            if rank == 0:
                full = torch.zeros(self.gathered_numel, dtype=self.dtype, device=device)  # (W * per,): one layer
                for p, _, off, n, _ in self.slots:
                    full[off : off + n] = p.detach().reshape(-1)
            source.scatter(full, self.shard)
        else:
            for p, _, off, n, _ in self.slots:  # copy each parameter's part of [lo, hi): no full-layer temporary
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    self.shard[a - lo : b - lo] = p.detach().reshape(-1)[a - off : b - off]
        self.empty = torch.empty(0, dtype=self.dtype, device=device)
        self.buffers: list[torch.Tensor] | None = None  # while gathered: the buffer, then cast copies
        real = materialize(module, lambda p: self.empty)  # an empty-weights process: real placeholders
        self.slots = [(real.get(id(p), p), *rest) for p, *rest in self.slots]
        for p, *_ in self.slots:
            p.data = self.empty

    def gather(self, comm: Collective, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Gather into ``buffer`` (at least ``gathered_numel``); the parameters become views of it."""
        comm.all_gather(self.shard, buffer[: self.gathered_numel])
        full = buffer[: self.numel]  # (numel,)
        buffers = [full]
        for p, shape, off, n, cast in self.slots:
            view = full[off : off + n].view(shape)
            if cast is not None:  # a Linear weight held in the autocast dtype while gathered
                view = view.to(cast)
                buffers.append(view)
            p.data = view
        self.buffers = buffers
        return buffers

    def release(self) -> None:
        for p, *_ in self.slots:
            p.data = self.empty
        self.buffers = None

    def restore(self, comm: Collective) -> None:
        """Gather once more and keep the full parameters (in their own dtype): unsharded again."""
        full = torch.empty(self.gathered_numel, dtype=self.dtype, device=self.shard.device)
        comm.all_gather(self.shard, full)
        for p, shape, off, n, _ in self.slots:
            p.data = full[off : off + n].view(shape)
        self.buffers = None


@dataclass(frozen=True)
class _Saved:
    """A saved weight, by where it lives in its unit's gathered buffers."""

    unit: _Unit
    buffer: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class ShardedLayers:
    """Shard a frozen model's layers over processes, in place; use it as a context manager around
    the training loop (gather hooks and saved-tensor hooks are active inside).

    Args:
        model: a frozen HF causal LM on the CPU (its layers are sharded, then the model moves to ``device``).
        comm: this process's rank, world size and all-gather (a distributed/runtime.py runtime).
        config: which modules form the units.
        device: where the shards and the replicated rest live.
        compute_dtype: hold Linear weights in this dtype while gathered (the autocast dtype: the same
            numbers as autocast's per-call casts, and backward keeps no cast copies alive).
        restore: on exit, gather every layer back (the caller's model is left unsharded).
    """

    def __init__(self, model: nn.Module, comm: Collective, config: ShardingConfig = ShardingConfig(),
                 device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
                 restore: bool = False):
        self.model, self.comm, self.restore_on_exit = model, comm, restore
        device = device or torch.device("cpu")
        self.full_bytes = sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()))
        layers = layer_modules(model, config.layer_classes)
        compute: dict[int, torch.dtype] = {}
        if compute_dtype is not None:
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    for p in m.parameters(recurse=False):
                        if p.dtype == torch.float32:
                            compute[id(p)] = compute_dtype
        source = None
        if config.efficient_loading:  # process 0 read the checkpoint; the others hold meta parameters
            check_same_model(model, comm, "FSDP cpu_ram_efficient_loading")
            source = comm
        self.units = [_Unit(i, m, comm.rank, comm.world_size, device, compute, source) for i, m in enumerate(layers)]
        if source is not None:
            receive(model, source, device)  # process 0's replicated rest
        model.to(device)  # the replicated rest (the units' parameters are empty placeholders by now)
        self.gathers = 0
        """All-gathers done so far (forward and backward)."""
        self._live: dict[int, tuple[_Unit, int]] = {}  # storage address -> (unit, buffer index)
        self._buffer: dict[torch.dtype, torch.Tensor] = {}  # one gather buffer per dtype, reused by every unit
        self._current: dict[torch.dtype, _Unit] = {}  # the unit gathered in it now
        self._hooks: contextlib.ExitStack | None = None

    # --- memory facts

    def local_bytes(self) -> int:
        """Bytes of base parameters this process holds between layer calls (its shards + the replicated rest)."""
        units = {id(p) for u in self.units for p, *_ in u.slots}
        rest = sum(p.numel() * p.element_size() for p in dict.fromkeys(self.model.parameters()) if id(p) not in units)
        return rest + sum(u.shard.numel() * u.shard.element_size() for u in self.units)

    def sharded_bytes(self) -> int:
        """Bytes of the sharded layers' parameters in full (all processes together)."""
        return sum(u.numel * u.shard.element_size() for u in self.units)

    # --- gather / release

    def _gather(self, unit: _Unit) -> list[torch.Tensor]:
        if unit.buffers is None:
            if unit.dtype in self._current:  # one unit gathered at a time: the buffer is shared
                self._release(self._current[unit.dtype])
            if unit.dtype not in self._buffer:
                size = max(u.gathered_numel for u in self.units if u.dtype == unit.dtype)
                self._buffer[unit.dtype] = torch.empty(size, dtype=unit.dtype, device=unit.shard.device)
            self.gathers += 1
            for j, b in enumerate(unit.gather(self.comm, self._buffer[unit.dtype])):
                self._live[b.untyped_storage().data_ptr()] = (unit, j)
            self._current[unit.dtype] = unit
        return unit.buffers

    def _release(self, unit: _Unit) -> None:
        if unit.buffers is None:
            return
        for b in unit.buffers:
            self._live.pop(b.untyped_storage().data_ptr(), None)
        unit.release()
        self._current.pop(unit.dtype, None)

    def _pre_forward(self, module, args) -> None:
        self._gather(self._unit_of[id(module)])

    def _post_forward(self, module, args, output) -> None:
        self._release(self._unit_of[id(module)])

    def _pack(self, t: torch.Tensor):
        hit = self._live.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided and t.numel() else None
        if hit is None:  # not a gathered weight: autograd keeps it as usual
            return t
        return _Saved(hit[0], hit[1], t.size(), t.stride(), t.storage_offset())

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        # freed after its forward: gather it again (once per layer and pass; it stays until the next gather)
        buffers = self._gather(saved.unit)
        return buffers[saved.buffer].as_strided(saved.size, saved.stride, saved.offset)

    def end_step(self) -> None:
        """After a step's backward (or an evaluation), on every process: free the layer still gathered."""
        for unit in list(self._current.values()):
            self._release(unit)

    # --- context

    def __enter__(self) -> "ShardedLayers":
        self._unit_of = {id(u.module): u for u in self.units}
        stack = contextlib.ExitStack()
        for u in self.units:
            stack.callback(u.module.register_forward_pre_hook(self._pre_forward).remove)
            stack.callback(u.module.register_forward_hook(self._post_forward).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        self._hooks = stack
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.close()
        for u in self.units:
            self._release(u)
        self._buffer.clear()
        if self.restore_on_exit and exc[0] is None:
            for u in self.units:
                u.restore(self.comm)
