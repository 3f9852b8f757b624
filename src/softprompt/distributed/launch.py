"""``accelerate launch``: reading what it set up (environment, FSDP / DeepSpeed configs) and
starting it (``softprompt train --processes N`` relaunches itself under it).

Not here: the runtime the loop talks to (runtime.py), sharding the base (sharding/).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError
from ..extras import require
from .sharding import ShardingConfig


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


TRUE = ("1", "true", "yes")


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in TRUE


def _off(value: str) -> bool:
    return value.lower() not in TRUE


FSDP_SETTINGS: dict[str, tuple[Callable[[str], bool], str]] = {
    "FSDP_RESHARD_AFTER_FORWARD": (lambda v: v.lower() in ("", "true", "1", "full_shard"),
                                   "fsdp_reshard_after_forward must be true (FULL_SHARD): each layer is freed "
                                   "after its forward, else the whole base stays gathered through the step"),
    "FSDP_SHARDING_STRATEGY": (lambda v: v.upper() in ("", "FULL_SHARD", "1"),
                               "fsdp_sharding_strategy must be FULL_SHARD: the base is frozen, so only its "
                               "weights can be sharded (no gradients or optimizer state)"),
    "FSDP_OFFLOAD_PARAMS": (_off, "fsdp_offload_params (CPU offload) is not supported; set it to false"),
    "FSDP_ACTIVATION_CHECKPOINTING": (_off, "fsdp_activation_checkpointing is not supported with a sharded base; "
                                            "set it to false"),
    "FSDP_AUTO_WRAP_POLICY": (lambda v: v.upper() in ("", "TRANSFORMER_BASED_WRAP"),
                              "fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP: softprompt shards one "
                              "decoder layer per unit"),
    "FSDP_IGNORED_MODULES": (lambda v: not v, "fsdp_ignored_modules is not supported"),
}
"""The accelerate FSDP settings softprompt checks: env var -> (accepted?, why not). The others
(fsdp_version 1 or 2, prefetch, state dict type, use_orig_params, sync_module_states,
min_num_params) make no difference to how softprompt shards the base;
fsdp_cpu_ram_efficient_loading is honoured (``ShardingConfig.efficient_loading``)."""


DEEPSPEED_USED = ("zero_optimization", "bf16", "fp16")
"""The DeepSpeed config sections softprompt reads: how the base is partitioned, and the precision.
Optimizer, scheduler, batch sizes, gradient clipping and the rest come from softprompt's flags."""


def _read_json(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"DeepSpeed config {path}: cannot read it ({e.strerror or e})") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path}, line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"DeepSpeed config {path}: must be a JSON object")
    return raw


def deepspeed_config(env: Mapping[str, str] = os.environ) -> dict:
    """The DeepSpeed config an accelerate DeepSpeed launch asks for: its ``deepspeed_config_file``,
    else the accelerate config's fields (``zero_stage``, ``offload_param_device``), as DeepSpeed JSON.

    Raises:
        ConfigError: an unreadable file, a stage other than 0-3 (one line).
    """
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if path and path.lower() != "none":
        config = _read_json(path)
        where = f"DeepSpeed config {path}"
    else:
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()  # accelerate's default stage
        zero: dict[str, Any] = {"stage": int(stage) if stage.isdigit() else stage}
        device = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").strip().lower()
        if device not in ("", "none"):
            zero["offload_param"] = {"device": device}
        config, where = {"zero_optimization": zero}, "accelerate DeepSpeed config"
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        got = zero.get("stage") if isinstance(zero, dict) else zero
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3 (got {got!r})")
    return config


def deepspeed_note(config: Mapping[str, Any]) -> str:
    """One line on what softprompt does with a DeepSpeed config (pure)."""
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    ignored = sorted(k for k in config if k not in DEEPSPEED_USED)
    if stage == 3:
        note = "DeepSpeed ZeRO-3: the frozen base's decoder layers are partitioned over the processes"
    else:
        note = (f"DeepSpeed ZeRO-{stage}: data parallel (ZeRO-{stage} shards optimizer state and gradients, which "
                "for a prompt are kilobytes; use zero_stage 3 to partition the base)")
    if ignored:
        note += f"; from softprompt's flags, not the DeepSpeed config: {', '.join(ignored)}"
    return note


def sharding_config(deepspeed: Mapping[str, Any] | None = None) -> ShardingConfig | None:
    """The sharding an ``accelerate launch`` config asks for: FSDP (softprompt's own sharding) or
    DeepSpeed ZeRO-3 (DeepSpeed's partitioning); None for data parallel (no config, or ZeRO 0-2).
    ``deepspeed``: the DeepSpeed config if already read (default: read it).

    Raises:
        ConfigError: for settings softprompt does not honour (one line).
    """
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        config = deepspeed if deepspeed is not None else deepspeed_config()
        if config["zero_optimization"].get("stage") != 3:
            return None
        return ShardingConfig(engine="zero3", deepspeed=config,
                              efficient_loading=_env_true("ACCELERATE_DEEPSPEED_ZERO3_INIT"))
    if not _env_true("ACCELERATE_USE_FSDP"):
        return None
    for var, (ok, why) in FSDP_SETTINGS.items():
        if not ok(os.environ.get(var, "").strip()):
            raise ConfigError(f"accelerate FSDP config: {why} (got {var}={os.environ.get(var)!r})")
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return ShardingConfig(layer_classes=classes, efficient_loading=_env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"))


def accelerate_precision(deepspeed: Mapping[str, Any] | None = None) -> str | None:
    """``--precision`` from ``accelerate launch --mixed_precision`` / the accelerate config
    (bf16, fp16), or a DeepSpeed config's ``bf16``/``fp16`` ``enabled: true``; None when they say
    "no" or nothing (then softprompt's own default holds). ``deepspeed``: the DeepSpeed config if
    already read (default: read it)."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if mp in ("bf16", "fp16"):
        return mp
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        config = deepspeed if deepspeed is not None else deepspeed_config()
        for name in ("bf16", "fp16"):
            if (config.get(name) or {}).get("enabled") is True:
                return name
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a child process to take)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_FLAGS = {"FSDP": "--use_fsdp", "DEEPSPEED": "--use_deepspeed"}
"""The default accelerate config's distributed type -> the ``accelerate launch`` flag that keeps it
when ``--num-processes`` is given (any other type runs data parallel: ``--multi_gpu``)."""


def default_config_sharding() -> str | None:
    """``"FSDP"`` or ``"DEEPSPEED"`` when the user's default accelerate config (``accelerate config``)
    asks for one, else None."""
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        if not os.path.isfile(default_config_file):
            return None
        kind = str(load_config_from_file(default_config_file).distributed_type).upper()
    except Exception:  # no accelerate, or a config it cannot read: accelerate launch will say so itself
        return None
    return next((k for k in LAUNCH_FLAGS if kind.endswith(k)), None)


def launch_command(train_args: Sequence[str], num_processes: int | None = None,
                   port: int | None = None, sharding: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``softprompt train TRAIN_ARGS`` (pure
    apart from picking a free port). Without ``num_processes`` the accelerate config decides;
    with it, ``sharding`` ("FSDP", "DEEPSPEED") keeps the config's sharding settings (else the
    processes run data parallel)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
        if num_processes > 1:
            # "multi_gpu" is accelerate's torchrun launcher; on a machine without GPUs the
            # processes join a gloo group (AccelerateRuntime passes cpu=True).
            cmd += [LAUNCH_FLAGS.get(sharding or "", "--multi_gpu"), "--main_process_port", str(port or free_port())]
    return cmd + ["-m", "softprompt", "train", *train_args]


def relaunch(train_args: Sequence[str], num_processes: int | None = None) -> int:
    """``softprompt train --launcher accelerate ...``: run the same command under accelerate."""
    require("distributed", "--launcher accelerate")
    proc = subprocess.run(launch_command(train_args, num_processes, sharding=default_config_sharding()))
    return 0 if proc.returncode == 0 else 2
