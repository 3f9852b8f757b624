"""``softprompt eval PROMPT --data FILE``: metrics of a prompt file on labelled data, with baselines.

The command line only; the scoring is ``evaluate/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_help import add_device
from ..errors import ConfigError
from ..evaluate.baselines import BaselineConfig
from ..evaluate.compare import (TRAIN_FILE_KEYS, EvalConfig, check_labels, evaluate_file, format_details,  # noqa: F401
                            print_result, trained_spec, training_file)
from ..precision import PRECISIONS


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a prompt file on labelled data, optionally against baselines",
                       description="Score a prompt file on labelled data (JSONL, CSV, Parquet, a saved dataset or hf:NAME). Classification: accuracy, "
                                   "macro-F1, per-class precision/recall, confusion matrix. Generation: exact "
                                   "match, ROUGE-L, chrF. --baselines adds the bare model, an instruction (plain, and "
                                   "in the model's chat template when it has one), few-shot examples and "
                                   "(classification) TF-IDF + logistic regression.")
    p.add_argument("prompt", help="the .safetensors prompt file")
    p.add_argument("--data", required=True, help="labelled data: .jsonl, .csv, .parquet, a folder saved by datasets "
                                                 "(FOLDER[:SPLIT]) or hf:NAME[/CONFIG][:SPLIT]")
    p.add_argument("--model", default=None, help="base model (hub id or folder); default: the default model")
    p.add_argument("--baselines", action="store_true", help="also score the baselines on the same examples")
    p.add_argument("--train", default=None,
                   help="training file for few-shot and TF-IDF (default: the one the prompt was trained on)")
    p.add_argument("--shots", type=int, default=5, help="in-context examples of the few-shot baseline (default: 5)")
    p.add_argument("--instruction", default=None, help="text of the instruction baselines (default: built from the labels)")
    p.add_argument("--seed", type=int, default=0, help="seeds the shots, the classifier and --limit (default: 0)")
    p.add_argument("--max-length", type=int, default=None,
                   help="most tokens of template + text (default: the prompt's training value, else 256)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="score a seeded, stratified subsample of N examples")
    p.add_argument("--source-field", default=None, help="field of the input text (default: text / input)")
    p.add_argument("--target-field", default=None, help="field of the label / output (default: label / output)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (generate)")
    p.add_argument("--stop", action="append", default=[], help="stop string for generation (repeatable)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a prompt trained on a differently quantized copy of the base model")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default: bf16 autocast where the CPU/GPU runs bf16 natively, else fp32), fp32, bf16, fp16")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report", default=None, help="write an HTML report (plots as PNG next to it)")
    p.add_argument("--log", default=None, help="training metrics.jsonl for the report (default: found next to the prompt)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        prompt=args.prompt, data=args.data, model=args.model, baselines=args.baselines, train=args.train,
        baseline=BaselineConfig(shots=args.shots, seed=args.seed, instruction=args.instruction),
        max_length=args.max_length, batch_size=args.batch_size, limit=args.limit,
        source_field=args.source_field, target_field=args.target_field, max_new_tokens=args.max_new_tokens,
        stop=args.stop, allow_other_base=args.allow_other_base, precision=args.precision, device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.report and not args.report.lower().endswith((".html", ".htm")):
        raise ConfigError(f"--report must name an .html file, got {args.report!r}")
    result = evaluate_file(config)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_result(result)
    if args.report:
        from ..evaluate.report import write_report

        paths = write_report(args.report, result, log=args.log)
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr if args.json else sys.stdout)
    return 0
