"""``softprompt train``: flags -> :class:`softprompt.train.TrainConfig` -> :func:`softprompt.train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Collection

from ..artifact import STORAGE_DTYPES
from ..base import DTYPES
from ..tasks import TASK_KINDS
from ..trainable import REPARAMS
from ..methods import METHODS
from ..errors import ConfigError
from ..precision import PRECISIONS
from ..train.config import INITS
from ..tasks.classify import CLASSIFY_LOSSES
from ..train.balance import CLASS_WEIGHT_CHOICES, SELECT_METRIC_CHOICES
from ..train.schedule import SAMPLINGS, SCHEDULES


def _float_or_none(v: str):
    return None if v.lower() in ("none", "off") else float(v)


def _int_or_none(v: str):
    return None if v.lower() in ("none", "off") else int(v)


def _int_or_auto(v: str):
    return "auto" if v.lower() == "auto" else int(v)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a soft prompt (or one per task) on a frozen base model",
        description="Train a soft prompt on a frozen base model. Only the prompt trains; the loss covers only "
                    "target tokens. Classification is trained and scored as rank classification over each "
                    "label's full token sequence. Writes the prompt file(s) plus metrics.jsonl and periodic "
                    "checkpoints in the run directory (default: <out>.run/ next to --out).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p)
    p.set_defaults(func=run)


def add_flags(p: argparse.ArgumentParser, leave_out: Collection[str] = (), between=None) -> None:
    """The train command's flags, in their groups, on ``p`` (``softprompt tune`` shares them): those
    in ``leave_out`` (e.g. ``"--resume"``) are not added and parse as their train defaults, so
    :func:`config_from_args` reads ``p``'s arguments as it reads train's. ``between(p)`` adds the
    caller's own groups before the run flags."""
    left: dict[str, object] = {}
    for title, add in (("data and task", _data_flags), ("model", _model_flags),
                       ("prompt and optimisation", _optimisation_flags), ("evaluation and run", _run_flags)):
        if add is _run_flags and between is not None:
            between(p)
        add(_Without(p.add_argument_group(title), set(leave_out), left))
    p.set_defaults(**left)


class _Without:
    """An argument group that leaves out some flags, recording their defaults in ``left`` (dest -> default)."""

    def __init__(self, group, leave_out: set[str], left: dict[str, object]):
        self.group, self.leave_out, self.left = group, leave_out, left

    def add_argument(self, *names: str, **kw):
        if names[0] not in self.leave_out:
            return self.group.add_argument(*names, **kw)
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        self.left[dest] = False if kw.get("action") == "store_true" else kw.get("default")
        return None


def _data_flags(d) -> None:
    d.add_argument("--data", help="training data: .jsonl, .csv, .parquet, a folder saved by datasets "
                                  "(FOLDER[:SPLIT]), or a Hugging Face dataset hf:NAME[/CONFIG][:SPLIT] (split default: train)")
    d.add_argument("--task", default=TASK_KINDS[0], choices=list(TASK_KINDS), help="task type")
    d.add_argument("--out", default=None, help="prompt file to write (a directory with --task-file)")
    d.add_argument("--name", default=None, help="task name recorded in the prompt file (default: --out's name)")
    d.add_argument("--eval", default=None, help="dev data, in any form --data takes (a dataset with several splits "
                                                "must name one, e.g. hf:glue/sst2:validation): early stopping keeps "
                                                "the best prompt on it")
    d.add_argument("--eval-split", type=float, default=None, help="or hold out this fraction of --data as dev set")
    d.add_argument("--template", default=None,
                   help='text around each example; \\n and \\t are read as newline and tab, e.g. '
                        '"Text: {text}\\nTopic:" (default: "Text: {text}\\nLabel:" or "Input: {input}\\nOutput:")')
    d.add_argument("--labels", default=None, help="comma-separated label order (default: sorted training labels)")
    d.add_argument("--verbalizer", default=None, help='label words: "label=words,..." or JSON (text or file)')
    d.add_argument("--text-field", default=None, help="field holding the text (classify; default: text)")
    d.add_argument("--label-field", default=None, help="field holding the label (classify; default: label)")
    d.add_argument("--input-field", default=None, help="field holding the input (generate; default: input)")
    d.add_argument("--output-field", default=None, help="field holding the output (generate; default: output)")
    d.add_argument("--task-file", default=None,
                   help="JSON listing several tasks, trained together in mixed batches, one prompt each")


def _model_flags(m) -> None:
    m.add_argument("--model", default=None, help="base model: hub id or local folder (default: SmolLM2-135M-Instruct)")
    m.add_argument("--dtype", default="float32", choices=["auto", *DTYPES],
                   help="weight dtype of the base (the prompt stays float32)")
    m.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="compute precision: auto = bf16 autocast where the CPU/GPU has fast bf16, else fp32")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--device-map", default=None, help='spread a large base over devices ("auto"; one process)')
    m.add_argument("--quantize", default=None, choices=["4bit", "8bit"], help="bitsandbytes base weights (CUDA)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    m.add_argument("--memory-budget", default="auto", metavar="SIZE",
                   help="switch gradient checkpointing on when a step's estimated activations pass SIZE: auto (half "
                        "the memory free at start), none, or e.g. 6GB")
    m.add_argument("--attention", default="auto", choices=["auto", "eager", "sdpa", "model"],
                   help="attention implementation while training (auto: eager on CPU under bf16, measured faster; else the model's)")


def _optimisation_flags(o) -> None:
    o.add_argument("--prompt-length", type=int, default=20, help="virtual tokens")
    o.add_argument("--init", default="auto", choices=list(INITS),
                   help="prompt init (auto: labels for classification, text with --init-text, else vocab)")
    o.add_argument("--init-text", default=None, help="text for --init text")
    o.add_argument("--init-from", default=None,
                   help="start from this trained prompt file of the same base model (prompt transfer)")
    o.add_argument("--method", default="prompt", choices=list(METHODS),
                   help="prompt: P trained input embeddings; prefix: P trained keys/values at every layer "
                        "(a deep prompt, prefix tuning; starts at the keys/values of the --init tokens)")
    o.add_argument("--reparam", default=None, choices=list(REPARAMS),
                   help="train through a reparameterisation, collapsed to a plain prompt at save: "
                        "mlp (--method prefix, Li & Liang), scaled (--method prefix: steps relative to each layer's "
                        "key/value size) or residual (--method prompt, Razdaibiedina et al.)")
    o.add_argument("--reparam-hidden", type=int, default=None,
                   help="hidden width of the --reparam MLP (default: 512 for mlp, 400 for residual)")
    o.add_argument("--max-steps", type=_int_or_auto, default=None,
                   help="optimizer steps (default: 100); auto (with --max-time): planned from the data size and budget")
    o.add_argument("--max-time", default=None,
                   help="wall-clock budget: seconds or 90s, 15m, 1h; stops there keeping the best prompt on dev")
    o.add_argument("--epochs", type=float, default=None, help="passes over the data (instead of --max-steps)")
    o.add_argument("--batch-size", type=int, default=8, help="examples per step, all processes together")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (same result, less memory)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW) (default: 0.1; 0.01 with --method prefix; 0.001 with --reparam mlp)")
    o.add_argument("--warmup", type=float, default=0.1, help="warmup: fraction of steps (<1) or steps")
    o.add_argument("--schedule", default="cosine", choices=list(SCHEDULES), help="lr decay")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--max-grad-norm", type=_float_or_none, default=1.0, help="clip each prompt's grad norm (none: off)")
    o.add_argument("--classify-loss", default="ce", choices=list(CLASSIFY_LOSSES),
                   help="ce: cross-entropy over the labels' summed log-probs; ce+lm: plus the gold label's LM loss")
    o.add_argument("--class-weights", default="none", choices=list(CLASS_WEIGHT_CHOICES),
                   help="per-row loss weight by class: none (default), balanced (inverse class frequency), or "
                        "auto (balanced when a task's labels are skewed beyond 3:1)")
    o.add_argument("--sampling", default="uniform", choices=list(SAMPLINGS),
                   help="batches: uniform (each row once an epoch) or balanced (each class of a task equally often)")
    o.add_argument("--seed", type=int, default=0, help="seeds init and data order")
    o.add_argument("--max-length", type=int, default=256, help="most source tokens (longer texts are cut)")
    o.add_argument("--max-target-length", type=int, default=64, help="most target tokens (generate)")


def _run_flags(e) -> None:
    e.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 5 times a run)")
    e.add_argument("--eval-batch-size", type=int, default=16, help="batch size of dev evaluation")
    e.add_argument("--select-metric", default="auto", choices=list(SELECT_METRIC_CHOICES),
                   help="dev metric that keeps the best prompt and drives early stopping (auto: macro_f1 when "
                        "a task's labels are skewed beyond 3:1, else accuracy)")
    e.add_argument("--calibrate", default="none", choices=["auto", "none"],
                   help="label-score calibration fitted on dev at the end (classification): auto keeps per-label "
                        "biases when they raise the dev metric; stored in the prompt file, used by eval/predict/serve")
    e.add_argument("--patience", type=_int_or_none, default=3, help="evaluations without improvement before stopping (none: off)")
    e.add_argument("--run-dir", default=None, help="metrics.jsonl + checkpoint.safetensors (default: <out>.run/)")
    e.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: 10 a run; 0: off)")
    e.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    e.add_argument("--prompt-dtype", default="float16", choices=list(STORAGE_DTYPES),
                   help="storage dtype of the prompt file")
    e.add_argument("--report-to", default="none",
                   help="experiment trackers that also get the config and every metric, comma-separated: "
                        "tensorboard, mlflow, wandb, all (every installed one) or none")
    e.add_argument("--run-name", default=None, help="the run's name in the trackers (default: --out's name)")
    e.add_argument("--launcher", default=None, choices=["accelerate"],
                   help="run this command under `accelerate launch` (data parallel over processes/GPUs, or the "
                        "base sharded when your accelerate config asks for FSDP or DeepSpeed ZeRO-3; "
                        "same as `accelerate launch -m softprompt train ...`)")
    e.add_argument("--num-processes", type=int, default=None,
                   help="processes for --launcher accelerate (default: your accelerate config)")
    e.add_argument("--quiet", action="store_true", help="print nothing but errors")


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` the flags describe (validated)."""
    from ..train import TrainConfig

    if args.text_field and args.input_field:
        raise ConfigError("give --text-field (classify) or --input-field (generate), not both")
    if args.label_field and args.output_field:
        raise ConfigError("give --label-field (classify) or --output-field (generate), not both")
    out = args.out or ("prompts" if args.task_file else None)
    if out is None:
        raise ConfigError("--out is required (the prompt file to write)")
    labels = [l.strip() for l in args.labels.split(",") if l.strip()] if args.labels else None
    template = unescape(args.template) if args.template else None
    return TrainConfig(
        data=args.data, task=args.task, out=out, name=args.name, template=template, labels=labels,
        verbalizer=args.verbalizer, eval=args.eval, eval_split=args.eval_split,
        source_field=args.text_field or args.input_field, target_field=args.label_field or args.output_field,
        task_file=args.task_file, model=args.model, dtype=args.dtype, device=args.device,
        device_map=args.device_map, quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing,
        memory_budget=args.memory_budget,
        attention=args.attention,
        prompt_length=args.prompt_length, init=args.init, init_text=args.init_text, init_from=args.init_from, method=args.method,
        reparam=args.reparam, reparam_hidden=args.reparam_hidden, max_steps=args.max_steps, max_time=args.max_time, calibrate=args.calibrate,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        classify_loss=args.classify_loss, class_weights=args.class_weights, sampling=args.sampling,
        select_metric=args.select_metric, precision=args.precision, seed=args.seed, max_length=args.max_length,
        max_target_length=args.max_target_length, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        patience=args.patience, run_dir=args.run_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        quiet=args.quiet, prompt_dtype=args.prompt_dtype, report_to=args.report_to, run_name=args.run_name,
    )


def unescape(template: str) -> str:
    """``--template``: "\\n" and "\\t" typed in a shell become a newline and a tab (pure)."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # validate before starting any process
    if args.launcher:
        from ..distributed import relaunch

        return relaunch(strip_launcher_args(_train_argv()), args.num_processes)
    if args.num_processes is not None:
        raise ConfigError("--num-processes goes with --launcher accelerate")
    if config.quiet:
        _silence()
    from ..distributed import shutdown
    from ..train import train

    train(config)  # under `accelerate launch`, train() joins the launched processes
    shutdown()
    return 0


def _train_argv() -> list[str]:
    """This command's own arguments (after ``train``)."""
    argv = sys.argv[1:]
    return argv[argv.index("train") + 1 :] if "train" in argv else argv


def strip_launcher_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--launcher`` / ``--num-processes`` (and their values); pure."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--launcher", "--num-processes"):
            skip = True
            continue
        if a.startswith(("--launcher=", "--num-processes=")):
            continue
        out.append(a)
    return out


def _silence() -> None:
    """--quiet: library warnings and progress bars off (errors still print)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")  # read when datasets is imported (hf: data)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # --report-to trackers
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if "datasets" in sys.modules:  # already imported: its environment variables were read
        sys.modules["datasets"].utils.logging.set_verbosity_error()
        sys.modules["datasets"].disable_progress_bars()
