"""Training settings: typed, validated up front (errors name the CLI flag). Each field is also
its ``softprompt train`` flag (config_flags.py): name, type, default and help (the docstring).

Not here: one task's settings (task_config.py), reading the data they point at (prepare.py), the loop (loop.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..artifact import STORAGE_DTYPES
from ..base import DTYPES
from ..config_flags import check_choices, flag
from ..trainable import REPARAMS
from ..errors import ConfigError
from ..methods import METHODS
from .balance import check as check_balance
from .memory import budget_error
from ..prompt import INIT_STRATEGIES
from .budget import check_budget
from .schedule import SCHEDULES
from .task_config import PER_TASK, TaskConfig, TaskFields, _out_flag, load_task_file
from .tracking import parse_report_to
from ..tasks.classify import CLASSIFY_LOSSES

Precision = Literal["auto", "fp32", "bf16", "fp16"]
INITS: tuple[str, ...] = ("auto", *INIT_STRATEGIES)

DEFAULT_MAX_STEPS = 100
"""Steps when neither --max-steps nor --epochs is given."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class TrainConfig(TaskFields):
    """Everything a training run needs. Validated on creation; errors name the CLI flag.

    One task: the :class:`TaskFields` (``data``, ``task``, ``template``, ...) and ``out`` is the prompt file.
    Several tasks: ``tasks`` (or ``task_file``) and ``out`` is a directory of prompt files.
    """

    out: str = field(default="prompt.safetensors", metadata=flag(default=None, convert=_out_flag))
    """Prompt file to write (one task), or the directory of prompt files (several tasks, --task-file)."""
    # --- several tasks ---
    task_file: str | None = field(default=None, metadata=flag(group="data and task"))
    """JSON listing several tasks, trained together in mixed batches, one prompt each (see load_task_file for
    its keys)."""
    tasks: list[TaskConfig] | None = field(default=None, metadata=flag(cli=False))
    """Tasks given directly (Python API)."""
    # --- model ---
    model: str | None = field(default=None, metadata=flag(group="model"))
    """Base model: hub id or local folder (default: the embedded SmolLM2-135M-Instruct)."""
    dtype: str = field(default="float32", metadata=flag(choices=("auto", *DTYPES)))
    """Weight dtype of the base model (the prompt stays float32)."""
    precision: Precision = "auto"
    """Compute precision: auto (bf16 autocast where the CPU/GPU has fast bf16, else fp32), fp32, bf16, fp16 (CUDA)."""
    device: str | None = field(default=None, metadata=flag(default="auto"))
    """cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)."""
    device_map: str | None = None
    """Spread a base that does not fit one device over several ("auto"); one process only."""
    quantize: Literal["4bit", "8bit"] | None = None
    """Load the base with bitsandbytes 4-/8-bit weights (CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more time."""
    memory_budget: str = field(default="auto", metadata=flag(metavar="SIZE"))
    """Switch gradient checkpointing on when a step's estimated activations pass this size: auto (half the memory
    free at start), none (never), or a size such as 6GB / 512MB."""
    attention: Literal["auto", "eager", "sdpa", "model"] = "auto"
    """Attention implementation while training: auto (eager on CPU under bf16, measured faster; the model's own
    elsewhere), eager, sdpa, model."""
    # --- prompt ---
    prompt_length: int = field(default=20, metadata=flag(group="prompt and optimisation"))
    """Virtual tokens per prompt."""
    init: str = field(default="auto", metadata=flag(choices=INITS))
    """Prompt init: auto (labels for classification, text with --init-text, else vocab), random, vocab, text, labels."""
    init_from: str | None = None
    """Start from this trained prompt file of the same base model (prompt transfer) instead of --init."""
    method: Literal["prompt", "prefix"] = "prompt"
    """prompt: P trained input embeddings; prefix: P trained keys/values at every layer (a deep prompt, prefix
    tuning; starts at the keys/values of the --init tokens)."""
    reparam: Literal["mlp", "residual", "scaled"] | None = None
    """Train through a reparameterisation, collapsed to a plain prompt at save: mlp (--method prefix, Li & Liang),
    scaled (--method prefix, steps relative to each layer's key/value size) or residual (--method prompt,
    Razdaibiedina et al.)."""
    reparam_hidden: int | None = None
    """Hidden width of the --reparam MLP (default: 512 for mlp, 400 for residual)."""
    # --- optimisation ---
    max_steps: int | Literal["auto"] | None = None
    """Optimizer steps (default: 100, or --epochs); auto (needs --max-time): the most steps and dev evaluations that
    fit the budget at a step time measured on this machine, re-fitted to the run's own pace early on (at its
    first dev evaluation), at most 10 passes over the data."""
    max_time: float | str | None = None
    """Stop training after this much wall-clock time (seconds, or "90s", "15m", "1h"), keeping the best
    prompt on dev; a resumed run counts the time already spent (default: no limit)."""
    planned: tuple[int, int, float] | None = field(default=None, metadata=flag(cli=False))
    """(steps, eval_every, seconds of a dev evaluation) of a --max-steps auto run planned by its caller from
    its own measurements (``softprompt tune``'s trials): used instead of probing here, then re-fitted like
    the run's own plan."""
    epochs: float | None = None
    """Passes over the training data (instead of --max-steps)."""
    batch_size: int = 8
    """Examples per optimizer step, over all processes and micro-batches."""
    grad_accum: int = 1
    """Split each step's batch into this many micro-batches (same result, less memory)."""
    lr: float | None = None
    """Peak learning rate (AdamW) (default: 0.1 for --method prompt, 0.01 for prefix, or the --reparam's own: 0.001 for mlp)."""
    warmup: float = 0.1
    """Warmup: a fraction of all steps (< 1) or a number of steps."""
    schedule: str = field(default="cosine", metadata=flag(choices=SCHEDULES))
    """Learning-rate decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prompt."""
    max_grad_norm: float | None = 1.0
    """Clip each prompt's gradient norm (none: no clipping)."""
    classify_loss: str = field(default="ce", metadata=flag(choices=CLASSIFY_LOSSES))
    """Classification loss: ce (cross-entropy over the labels' summed log-probs) or ce+lm (plus the gold label's LM loss)."""
    class_weights: Literal["auto", "none", "balanced"] = "none"
    """Per-row loss weight by class (balance.py): none, balanced (inverse class frequency, mean 1 over
    the training rows), or auto (balanced for a task whose labels are skewed beyond 3:1). The default is none:
    balanced weights cost accuracy without raising macro-F1 in README "Imbalanced labels" (default: none)."""
    sampling: Literal["uniform", "balanced"] = "uniform"
    """Batches: uniform (each row once per epoch) or balanced (every class of a task drawn equally often)."""
    seed: int = 0
    """Seeds prompt init and data order."""
    max_length: int = 256
    """Most source tokens (template included); longer texts are cut."""
    max_target_length: int = 64
    """Most target tokens for generation."""
    # --- evaluation and early stopping ---
    eval_every: int | None = field(default=None, metadata=flag(group="evaluation and run"))
    """Evaluate on the dev set every N steps (default: 5 times per run)."""
    eval_batch_size: int = 16
    """Batch size for dev evaluation."""
    select_metric: Literal["auto", "accuracy", "macro_f1", "log_loss"] = "auto"
    """Dev metric that keeps the best prompt and drives early stopping (classification): auto is
    macro_f1 for a task whose labels are skewed beyond 3:1, else accuracy."""
    calibrate: Literal["auto", "none"] = "none"
    """Label-score calibration fitted on dev at the end (classification): auto fits per-label biases on the dev
    label log-probs for the --select-metric and keeps them if they raise it; stored in the prompt file, used by
    eval/predict/serve."""
    patience: int | None = 3
    """Stop after this many evaluations without improvement (none: never stop early)."""
    # --- run management ---
    run_dir: str | None = None
    """Where metrics.jsonl and checkpoint.safetensors go (default: <out>.run/ next to --out)."""
    checkpoint_every: int | None = None
    """Write a checkpoint every N steps (default: 10 times per run; 0: never)."""
    resume: bool = False
    """Continue from the checkpoint in the run directory."""
    prompt_dtype: str = field(default="float16", metadata=flag(choices=STORAGE_DTYPES))
    """Storage dtype of the saved prompt files."""
    report_to: list[str] | str = field(default_factory=list, metadata=flag(default="none"))
    """Experiment trackers, comma-separated: tensorboard, mlflow, wandb, "all" (every installed one), or none
    (only metrics.jsonl); each also receives the config and every metrics record (see tracking.py)."""
    run_name: str | None = None
    """The run's name in the trackers (default: --out's name without suffix)."""
    quiet: bool = False
    """Print nothing but errors."""

    def __post_init__(self) -> None:
        def need(cond: bool, field_name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{_flag(field_name)} {msg}")

        given = sum(x is not None for x in (self.data, self.task_file, self.tasks))
        if given != 1:
            raise ConfigError("give exactly one of --data (one task) or --task-file (several tasks)")
        check_choices(self)  # every Literal / registry field (task, dtype, method, schedule, precision, ...)
        need(self.prompt_length >= 1, "prompt_length", f"must be at least 1, got {self.prompt_length}")
        need(self.reparam_hidden is None or self.reparam is not None, "reparam_hidden", "needs --reparam")
        need(self.reparam_hidden is None or self.reparam_hidden >= 1, "reparam_hidden",
             f"must be at least 1, got {self.reparam_hidden}")
        need(self.init != "text" or bool(self.init_text and self.init_text.strip()) or self.tasks is not None
             or self.task_file is not None, "init_text", "is required with --init text")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give either --max-steps or --epochs, not both")
        check_budget(self)
        need(self.epochs is None or self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        need(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        need(budget_error(self.memory_budget) is None, "memory_budget", str(budget_error(self.memory_budget)))
        need(self.grad_accum >= 1, "grad_accum", f"must be at least 1, got {self.grad_accum}")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"{self.grad_accum} must divide --batch-size {self.batch_size} (the batch is split into micro-batches)")
        if self.lr is None:
            self.lr = (REPARAMS[self.reparam].lr if self.reparam in REPARAMS else None) or METHODS[self.method].lr
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()), "warmup",
             f"must be a fraction below 1 or a whole number of steps, got {self.warmup}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             f"must be positive, got {self.max_grad_norm}")
        need(self.max_length >= 8, "max_length", f"must be at least 8, got {self.max_length}")
        need(self.max_target_length >= 2, "max_target_length", f"must be at least 2, got {self.max_target_length}")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every", f"must be at least 1, got {self.eval_every}")
        need(self.eval_batch_size >= 1, "eval_batch_size", f"must be at least 1, got {self.eval_batch_size}")
        need(self.patience is None or self.patience >= 1, "patience", f"must be at least 1, got {self.patience}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 0, "checkpoint_every",
             f"must be >= 0, got {self.checkpoint_every}")
        need(self.device_map is None or self.quantize is not None or self.device is None, "device_map",
             "and --device are exclusive")
        self.report_to = parse_report_to(self.report_to)
        need(self.run_name is None or bool(self.run_name.strip()) and "/" not in self.run_name, "run_name",
             f"must be non-empty, without slashes, got {self.run_name!r}")
        if self.data is not None:
            own = {f.name: getattr(self, f.name) for f in fields(TaskFields)}
            self.tasks_resolved = [TaskConfig(**{**own, "name": self.name or Path(self.out).name.split(".")[0] or "prompt"})]
        else:
            for name in PER_TASK:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{_flag(name)} belongs in the task file when training several tasks")
            tasks = self.tasks if self.tasks is not None else load_task_file(self.task_file)
            names = [t.name for t in tasks]
            if len(set(names)) != len(names):
                raise ConfigError(f"duplicate task names {names}")
            if not tasks:
                raise ConfigError("no tasks given")
            self.tasks_resolved = list(tasks)
        for t in self.tasks_resolved:
            need(self.reparam is None or REPARAMS[self.reparam].method == self.method_of(t), "reparam",
                 f"{self.reparam} applies to --method {REPARAMS[self.reparam].method if self.reparam else ''}, "
                 f"not {self.method_of(t)}" + (f" (task {t.name})" if self.multi else ""))
        check_balance(self)

    def method_of(self, task: TaskConfig) -> str:
        """A task's prompt method: its own, else --method."""
        return task.method or self.method

    @property
    def multi(self) -> bool:
        """Several tasks: ``out`` is a directory."""
        return self.data is None

    def tracker_run_name(self) -> str:
        """The run's name in the trackers: --run-name, else --out's name without suffix."""
        return self.run_name or Path(self.out).name.split(".")[0] or "softprompt"

    def run_path(self) -> Path:
        """The run directory (metrics.jsonl, checkpoint.safetensors)."""
        if self.run_dir:
            return Path(self.run_dir)
        out = Path(self.out)
        return out / "run" if self.multi else out.with_name(out.name.split(".")[0] + ".run")

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide the trained prompt (a resumed run must match them)."""
        skip = {"out", "run_dir", "resume", "quiet", "checkpoint_every", "device", "grad_accum", "eval_batch_size",
                "tasks", "task_file", "prompt_dtype", "device_map", "attention", "gradient_checkpointing", "memory_budget",
                "report_to", "run_name", "max_time", "planned"}  # a resumed run may get a longer budget
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["tasks"] = [{k: v for k, v in asdict(t).items() if k not in ("out", "data", "eval")}
                      for t in self.tasks_resolved]
        return json.loads(json.dumps(d, sort_keys=True, default=str))
