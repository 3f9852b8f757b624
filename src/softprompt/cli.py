"""The ``softprompt`` command line: routing only.

Each command lives in its own module under ``softprompt.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a plain function taking the
parsed arguments. User errors (:class:`SoftpromptError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import cli_help, progress
from .version import __version__
from .errors import SoftpromptError

COMMANDS: list[str] = [
    "softprompt.commands.example_data",
    "softprompt.commands.train",
    "softprompt.commands.tune",
    "softprompt.commands.eval",
    "softprompt.commands.predict",
    "softprompt.commands.inspect",
    "softprompt.commands.export",
    "softprompt.commands.import_",
    "softprompt.commands.serve",
    "softprompt.commands.demo",
]
"""Modules that register a subcommand, in ``--help`` order: the order of the workflow."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Prompt tuning for frozen open language models: train, evaluate, save and serve soft prompts.",
    )
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    parser.set_defaults(subcommands=sub.choices)  # name -> parser, for parse()
    cli_help.apply(parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, letting options and positionals of a subcommand come in any order
    (``predict P.safetensors --model M "some text"``): the subcommand's own parser reads its part
    with ``parse_intermixed_args``."""
    commands = parser.get_default("subcommands")
    i = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] not in commands:
        return parser.parse_args(argv)
    args = parser.parse_args(argv[:i])  # top-level options (--version, --help)
    args.command = argv[i]
    return commands[argv[i]].parse_intermixed_args(argv[i + 1 :], namespace=args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else list(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with progress.shown(not getattr(args, "quiet", False)):  # bars on stderr unless --quiet
            return int(args.func(args) or 0)
    except SoftpromptError as e:
        print(f"softprompt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softprompt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
