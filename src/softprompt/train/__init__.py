"""Training: one explicit loop that trains one prompt per task, on one process or many.

- ``task_config.py`` TaskFields (one task's settings, stated once), TaskConfig, load_task_file
- ``config.py``     TrainConfig (TaskFields + the run's), validated up front (errors name the flag)
- ``prepare.py``    the data files read and checked before any model loads (``prepare``)
- ``setup.py``      before the first step: launch checks, resume, model, prompts, rows
- ``objective.py``  the loss of a mixed batch (one prompt per task, per row)
- ``schedule.py``   data order and learning rate, pure functions of (seed, step)
- ``balance.py``    imbalanced labels: class weights and the dev select metric, resolved per task
- ``checkpoint.py`` the checkpoint file, and LoopState <-> checkpoint in one place
- ``speed.py``      activation checkpointing, attention implementation, weights in the compute dtype
- ``records.py``    metrics.jsonl and the TrainResult
- ``tracking.py``   --report-to: TensorBoard / MLflow / W&B as sinks of the metrics records
- ``loop.py``       ``train()``: load, build prompts, the loop, write prompt files
"""

from ..precision import PRECISIONS, cpu_has_fast_bf16, resolve_precision
from .config import DEFAULT_MAX_STEPS, TrainConfig
from .task_config import TaskConfig, load_task_file
from .loop import train
from .prepare import PreparedTask, prepare
from .records import TrainResult
from ..hf_compat import attention_implementation, gradient_checkpointing
from .speed import cast_linear_weights, resolve_attention, share_prompt_prefix

__all__ = ["TrainConfig", "TaskConfig", "TrainResult", "train", "prepare", "load_task_file", "resolve_precision",
           "cpu_has_fast_bf16", "DEFAULT_MAX_STEPS", "PRECISIONS", "PreparedTask", "attention_implementation",
           "cast_linear_weights", "gradient_checkpointing", "resolve_attention", "share_prompt_prefix"]
