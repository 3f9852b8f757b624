"""``softprompt train``: flags -> :class:`softprompt.train.TrainConfig` -> :func:`softprompt.train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Collection

from ..config_flags import config_from_args as config_from
from ..config_flags import add_config_flags
from ..train.config import TrainConfig
from ..errors import ConfigError

GROUPS = ("data and task", "model", "prompt and optimisation")
"""Help groups made first, in this order (a field opens its group where it comes; --init-text, a task
field, comes before the model's); "evaluation and run" follows, after the caller's own groups."""


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
    """The train command's flags, in their groups, on ``p`` (``softprompt tune`` shares them): one per
    :class:`TrainConfig` field (config_flags.py), plus the launcher's. Those in ``leave_out`` (e.g.
    ``"--resume"``) are not added and parse as their train defaults, so :func:`config_from_args` reads
    ``p``'s arguments as it reads train's. ``between(p)`` adds the caller's own groups before the run flags."""
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    add_config_flags(p, TrainConfig, leave_out=leave_out, groups=groups,
                     before={"evaluation and run": between} if between else None)
    run = groups["evaluation and run"]
    if "--launcher" not in leave_out:
        run.add_argument("--launcher", default=None, choices=["accelerate"],
                         help="run this command under `accelerate launch` (data parallel over processes/GPUs, or the "
                              "base sharded when your accelerate config asks for FSDP or DeepSpeed ZeRO-3; "
                              "same as `accelerate launch -m softprompt train ...`)")
    if "--num-processes" not in leave_out:
        run.add_argument("--num-processes", type=int, default=None,
                         help="processes for --launcher accelerate (default: your accelerate config)")
    p.set_defaults(**{name.lstrip("-").replace("-", "_"): None for name in ("--launcher", "--num-processes")
                      if name in leave_out})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the flags describe (validated)."""
    return config_from(TrainConfig, args)


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
