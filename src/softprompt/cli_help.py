"""One convention for every command's ``--help``: defaults printed once in one style, the same
flags said the same way, and one or two examples at the end.

:func:`apply` runs over the parsers the command modules registered, so a module only states its
flags; how help looks is decided here.
"""

from __future__ import annotations

import argparse
import re

from .devices import DEVICE_HELP

QUIET_HELP = "no progress bars or status lines (results and errors still print)"

EXAMPLES: dict[str, str] = {
    "example-data": "softprompt example-data bbc-news --out data/bbc",
    "train": "softprompt train --data tickets.csv --out prompts/tickets.safetensors\n"
             "  softprompt train --data train.jsonl --eval dev.jsonl --method prefix --max-steps 300 --out topic.safetensors",
    "tune": "softprompt tune --data train.jsonl --eval-split 0.1 --budget 20m --out prompts/tickets.safetensors\n"
            "  softprompt tune --data train.jsonl --eval dev.jsonl --budget 1h --trials 12 --methods prompt,prefix --out topic.safetensors",
    "eval": "softprompt eval prompts/tickets.safetensors --data test.csv --baselines\n"
            "  softprompt eval topic.safetensors --data hf:ag_news:test --limit 500 --report report.html",
    "predict": "softprompt predict prompts/tickets.safetensors \"I was charged twice\"\n"
               "  softprompt predict topic.safetensors --data texts.jsonl > predictions.jsonl",
    "inspect": "softprompt inspect prompts/tickets.safetensors --json",
    "export": "softprompt export topic.safetensors --out topic-peft",
    "import": "softprompt import topic-peft --out topic.safetensors --task classify --labels business,sport",
    "serve": "softprompt serve --prompts prompts\n"
             "  softprompt serve --prompts prompts --host 0.0.0.0 --api-key-file key.txt --device cuda",
    "demo": "softprompt demo\n  softprompt demo --max-steps 100 --precision fp32",
}
"""Command -> its help's examples (the lines after "examples:")."""


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped, examples as written; each option's default once, as ``(default: X)``,
    unless its help already says what the default is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d in (None, False, argparse.SUPPRESS, "", []) or action.option_strings == []:
            return text
        return f"{text} (default: {'%(default)s'})"


def _strip_stated_default(action: argparse.Action) -> None:
    """Drop a hand-written "(default X)" / "(default: X)" that only repeats the value: the formatter adds it."""
    if not action.help or action.default in (None, argparse.SUPPRESS):
        return
    value = re.escape(str(action.default))
    action.help = re.sub(rf"\s*\(default:? {value}\)", "", action.help)


def apply(parser: argparse.ArgumentParser) -> None:
    """Apply the convention to every subcommand parser of ``parser``."""
    for name, sub in parser.get_default("subcommands").items():
        sub.formatter_class = HelpFormatter
        if name in EXAMPLES:
            sub.epilog = "examples:\n  " + EXAMPLES[name]
        for action in sub._actions:
            _strip_stated_default(action)
            if action.dest == "quiet":
                action.help = QUIET_HELP
            elif action.dest == "device" and action.option_strings == ["--device"]:
                action.help = DEVICE_HELP


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device`` as every command that runs a model takes it."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
