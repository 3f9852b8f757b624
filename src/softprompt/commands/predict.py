"""``softprompt predict PROMPT [TEXT ...]``: label + class probabilities, or generated text, as JSONL.

The command line only; the predicting is ``predict.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..config_flags import add_config_flags
from ..config_flags import config_from_args as config_from
from ..tasks import task
from ..errors import ConfigError
from ..predict import PredictConfig, Predictor, data_items, predict_stream, read_items


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict with a prompt file (JSONL out)",
                       description="Predict with a prompt file: label + class probabilities (classify) or "
                                   "generated text (generate), one JSON line per input. Inputs: TEXT arguments, "
                                   "or lines on stdin (JSON objects with the task's source field, or plain text).")
    add_config_flags(p, PredictConfig)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="input texts (default: read lines from stdin)")
    p.add_argument("--data", default=None,
                   help="read the inputs from data instead: .jsonl, .csv, .parquet, a folder saved by datasets "
                        "(FOLDER[:SPLIT]) or hf:NAME[/CONFIG][:SPLIT]; the --field of each record, its id carried")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    config = config_from(PredictConfig, args)
    stdin = stdin or sys.stdin
    items = None
    if args.data:
        if args.texts:
            raise ConfigError("give TEXT arguments or --data, not both")
        from ..artifact import load_prompt

        kind = load_prompt(config.prompt).meta.task or "classify"  # the field default, before the model loads
        items = data_items(args.data, config.source_field or task(kind).fields[0])
    elif not args.texts and stdin.isatty():
        raise ConfigError("give TEXT arguments or pipe input lines on stdin (or read them from --data)")
    predictor = Predictor(config)
    if items is None:
        items = read_items(args.texts, stdin, predictor.source_field)
    predict_stream(predictor, items, stdout or sys.stdout, total=len(items) if isinstance(items, list) else
                   len(args.texts) or None)
    return 0
