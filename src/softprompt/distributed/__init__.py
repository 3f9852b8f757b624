"""Processes: several training processes, and a frozen base sharded over them.

- ``runtime.py``   what the loop asks of processes (rank, device, all-reduce, barrier); one process or Accelerate's
- ``launch.py``    reading ``accelerate launch``'s environment and configs; relaunching under it
- ``batches.py``   a global batch dealt to processes and micro-batches (pure)
- ``sharding/``    a frozen base sharded over the processes (a Sharder interface; FSDP-style and ZeRO-3)
"""

from .batches import lockstep_micro_batches, shard
from .launch import (DEEPSPEED_USED, FSDP_SETTINGS, LAUNCH_FLAGS, accelerate_precision,  # noqa: F401
                     default_config_sharding, deepspeed_config, deepspeed_note, launch_command, launched, relaunch,
                     sharding_config)
from .runtime import AccelerateRuntime, LocalRuntime, runtime_from_env, shutdown

__all__ = ["LocalRuntime", "AccelerateRuntime", "runtime_from_env", "shutdown", "launched", "deepspeed_config",
           "deepspeed_note", "sharding_config", "accelerate_precision", "default_config_sharding", "launch_command",
           "relaunch", "shard", "lockstep_micro_batches"]
