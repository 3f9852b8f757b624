"""``softprompt predict PROMPT [TEXT ...]``: label + class probabilities, or generated text, as JSONL.

The command line only; the predicting is ``predict.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..cli_help import add_device
from ..tasks import task
from ..errors import ConfigError
from ..precision import PRECISIONS
from ..predict import Item, PredictConfig, Predictor, chunks, data_items, parse_line, predict_stream, read_items  # noqa: F401


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict with a prompt file (JSONL out)",
                       description="Predict with a prompt file: label + class probabilities (classify) or "
                                   "generated text (generate), one JSON line per input. Inputs: TEXT arguments, "
                                   "or lines on stdin (JSON objects with the task's source field, or plain text).")
    p.add_argument("prompt", help="the .safetensors prompt file")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="input texts (default: read lines from stdin)")
    p.add_argument("--data", default=None,
                   help="read the inputs from data instead: .jsonl, .csv, .parquet, a folder saved by datasets "
                        "(FOLDER[:SPLIT]) or hf:NAME[/CONFIG][:SPLIT]; the --field of each record, its id carried")
    p.add_argument("--model", default=None, help="base model (hub id or folder); default: the default model")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default: 16)")
    p.add_argument("--max-length", type=int, default=None,
                   help="most tokens of template + text (default: the prompt's training value, else 256)")
    p.add_argument("--field", default=None, help="source field of JSON input lines (default: text / input)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (input i uses seed + i)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a prompt trained on a differently quantized copy of the base model")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default: bf16 autocast where the CPU/GPU runs bf16 natively, else fp32), fp32, bf16, fp16")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    config = PredictConfig(prompt=args.prompt, model=args.model, batch_size=args.batch_size,
                           max_length=args.max_length, source_field=args.field, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop,
                           allow_other_base=args.allow_other_base, precision=args.precision,
                           device=args.device)
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
