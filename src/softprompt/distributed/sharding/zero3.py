"""A frozen base partitioned by DeepSpeed ZeRO-3 (what an accelerate DeepSpeed config with
``zero_stage: 3`` asks for): DeepSpeed's own parameter partitioning, hooks and prefetching, as
DeepSpeed runs a model that has no optimizer (``DeepSpeedZeRoOffload``, its "ZeRO-3 inference"
engine), applied to the decoder layers.

Every process keeps 1/W of each decoder layer's weights (or offloads them, ``offload_param``);
DeepSpeed all-gathers a layer's weights before its forward and again before its backward. Only the
base is partitioned, and it is frozen; the prompts stay replicated and their gradients are
all-reduced by the runtime (distributed/runtime.py), exactly as in data-parallel training. Embeddings, lm
head and final norm stay replicated (as with the FSDP config, fsdp.py): the prompt is
initialised from the embedding matrix and prompt files fingerprint it.

DeepSpeed hooks every submodule, so the gradient that reaches a source pass's k/v projections
through rank classification's KV cache (not through the layer's output) finds their weights:
the projection's own pre-backward hook gathers them (tested against the unsharded gradients).

Collectives must pair up across processes: every process runs the same sequence of module
forwards (the loop's lockstep micro-batches, evaluation on every process), and :meth:`end_step`
is called by all of them at the same points (DeepSpeed checks that their module traces agree).

Not here: reading the launch config (distributed/launch.py), the FSDP-style sharding (fsdp.py).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import ConfigError
from .base import Collective, ShardingConfig, check_same_model, layer_modules, receive

AUTO_SIZES = {
    # zero_optimization keys that HF configs often leave as "auto", resolved as transformers'
    # DeepSpeed integration resolves them (from the model's hidden size).
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
    "reduce_bucket_size": lambda d: d * d,
}


def zero_section(config: Mapping[str, Any], hidden: int) -> dict[str, Any]:
    """The ``zero_optimization`` section with "auto" values resolved (pure). Unknown "auto"
    values are dropped (DeepSpeed's defaults apply)."""
    zero = {}
    for k, v in dict(config.get("zero_optimization") or {}).items():
        if v == "auto":
            if k not in AUTO_SIZES:
                continue
            v = AUTO_SIZES[k](hidden)
        zero[k] = v
    zero["stage"] = 3
    return zero


class Zero3Layers:
    """Partition a frozen model's decoder layers with DeepSpeed ZeRO-3, in place; use it as a
    context manager around the training loop (same interface as ``sharding.ShardedLayers``).

    Args:
        model: a frozen HF causal LM on the CPU (its layers are partitioned, the rest moves to ``device``).
        comm: this process's rank and world size (a distributed/runtime.py runtime; DeepSpeed uses the
            process group accelerate started).
        config: the DeepSpeed config (``config.deepspeed``) and which modules are the layers.
        device: where the replicated rest lives (DeepSpeed places the partitions on its accelerator
            device, or where ``offload_param`` says).
        compute_dtype: unused (autocast casts the gathered weights per call).
        restore: on exit, gather every layer back and remove DeepSpeed's hooks and attributes.
    """

    def __init__(self, model: nn.Module, comm: Collective, config: ShardingConfig,
                 device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
                 restore: bool = False):
        try:
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
            from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        except ImportError as e:
            raise ConfigError("the accelerate config asks for DeepSpeed ZeRO-3, which needs DeepSpeed: "
                              "pip install 'softprompt[deepspeed]'") from e
        self.model, self.comm, self.restore_on_exit = model, comm, restore
        self.full_bytes = sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()))
        layers = layer_modules(model, config.layer_classes, "DeepSpeed ZeRO-3")
        self.units = layers
        self._layers = nn.ModuleList(layers)  # DeepSpeed's root module; never called itself
        self._params = [p for m in layers for p in dict.fromkeys(m.parameters())]
        if len({p.dtype for p in self._params}) != 1:
            raise ConfigError("DeepSpeed ZeRO-3: the decoder layers hold parameters of several dtypes; "
                              "load the base with one --dtype")
        dtype = self._params[0].dtype
        hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": zero_section(config.deepspeed or {}, hidden)}
        try:
            zc = DeepSpeedZeroConfig(**ds["zero_optimization"])
        except (ValueError, TypeError) as e:  # DeepSpeed validates its config (pydantic): before any collective
            raise ConfigError(f"DeepSpeed ZeRO-3 config: {' '.join(str(e).split())}") from e
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import Init

        # DeepSpeed's own all-gathers still call torch's old name for it (renamed in torch 2.13)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        # DeepSpeed's communication layer, on the process group accelerate started
        deepspeed.init_distributed(dist_backend="nccl" if torch.device(device or "cpu").type == "cuda" else "gloo")
        self._before: dict[int, set[str]] = {}
        if config.efficient_loading:  # zero3_init_flag: process 0 read the checkpoint, the others hold meta weights
            check_same_model(model, comm, "DeepSpeed zero3_init_flag")
            off = zc.offload_param
            for layer in layers:  # one whole layer at a time: process 0's, then partitioned by DeepSpeed
                receive(layer, comm, device)
                self._remember(layer)
                Init(module=layer, config_dict_or_path=ds, dtype=dtype, pin_memory=bool(off and off.pin_memory),
                     remote_device=off.device if off and off.device != "none" else None)
            self._params = [p for m in layers for p in dict.fromkeys(m.parameters())]
            receive(model, comm, device)  # the replicated rest (partitioned layers hold empty placeholders)
        else:
            self._remember(self._layers)
            others = {id(p) for p in self._params}
            for p in dict.fromkeys(model.parameters()):  # the replicated rest (embeddings, lm head, final norm)
                if id(p) not in others:
                    p.data = p.data.to(device or p.device)
            for b in model.buffers():
                b.data = b.data.to(device or b.device)
        self.engine = DeepSpeedZeRoOffload(
            self._layers, timers=None, ds_config=ds, overlap_comm=zc.overlap_comm,
            prefetch_bucket_size=zc.prefetch_bucket_size, max_reuse_distance=zc.max_reuse_distance,
            max_live_parameters=zc.max_live_parameters, param_persistence_threshold=zc.param_persistence_threshold,
            model_persistence_threshold=zc.model_persistence_threshold, offload_param_config=zc.offload_param)
        self.engine.partition_all_parameters()

    def _remember(self, module: nn.Module) -> None:
        """Note the attributes ``module`` and its parameters have before DeepSpeed adds its own."""
        for o in [*dict.fromkeys(module.parameters()), *module.modules()]:
            self._before[id(o)] = set(vars(o))

    # --- memory facts

    def local_bytes(self) -> int:
        """Bytes of base parameters this process holds between layer calls (its partitions, the
        small parameters DeepSpeed keeps whole (``stage3_param_persistence_threshold``) and the
        replicated rest)."""
        mine = {id(p) for p in self._params}
        rest = sum(p.numel() * p.element_size() for p in dict.fromkeys(self.model.parameters()) if id(p) not in mine)
        held = 0
        for p in self._params:
            held += (p.ds_numel if p.ds_persist else p.ds_tensor.numel()) * p.ds_tensor.element_size()
        return rest + held

    def sharded_bytes(self) -> int:
        """Bytes of the partitioned layers' parameters in full (all processes together)."""
        return sum(p.ds_numel * p.ds_tensor.element_size() for p in self._params)

    # --- steps

    def end_step(self) -> None:
        """After a step's backward (or an evaluation), on every process: free what is still
        gathered and close DeepSpeed's module trace (it checks the processes agree)."""
        self.engine.partition_all_parameters()
        self.engine.get_param_coordinator().reset_step()

    # --- context

    def __enter__(self) -> "Zero3Layers":
        return self

    def __exit__(self, *exc) -> None:
        self.engine.partition_all_parameters()
        if not (self.restore_on_exit and exc[0] is None):
            return
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        full = []
        for m in self._layers:
            params = list(dict.fromkeys(m.parameters()))
            with GatheredParameters(params):
                full.append([p.data.clone() for p in params])
        self.engine.destroy()
        for m, tensors in zip(self._layers, full):  # plain parameters again, DeepSpeed's attributes gone
            for p, t in zip(dict.fromkeys(m.parameters()), tensors):
                p.data = t
        for o in [*self._params, *self._layers.modules()]:
            for k in set(vars(o)) - self._before.get(id(o), set(vars(o))):
                delattr(o, k)
        for m in self._layers.modules():
            if type(m._parameters) is not dict:
                m._parameters = {k: v for k, v in dict.items(m._parameters)}
