"""``softprompt eval PROMPT --data FILE``: metrics of a prompt file on labelled data, with baselines.

The command line only; the scoring is ``evaluate/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config_flags import add_config_flags
from ..config_flags import config_from_args as config_from
from ..errors import ConfigError
from ..evaluate.compare import EvalConfig, evaluate_file, print_result


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a prompt file on labelled data, optionally against baselines",
                       description="Score a prompt file on labelled data (JSONL, CSV, Parquet, a saved dataset or hf:NAME). Classification: accuracy, "
                                   "macro-F1, per-class precision/recall, confusion matrix. Generation: exact "
                                   "match, ROUGE-L, chrF. --baselines adds the bare model, an instruction (plain, and "
                                   "in the model's chat template when it has one), few-shot examples and "
                                   "(classification) TF-IDF + logistic regression.")
    add_config_flags(p, EvalConfig)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report", default=None, help="write an HTML report (plots as PNG next to it)")
    p.add_argument("--log", default=None, help="training metrics.jsonl for the report (default: found next to the prompt)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` the flags describe (validated)."""
    return config_from(EvalConfig, args)


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
