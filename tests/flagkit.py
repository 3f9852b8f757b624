"""What a command's flags are, as data: names, dest, default, choices, action, nargs, required,
metavar and group, per flag in ``--help`` order. ``tests/cli_flags.json`` holds them as they were
before the flags were generated from the config dataclasses (test_config_flags.py compares)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIXTURE = Path(__file__).with_name("cli_flags.json")
COMMANDS = ("train", "tune", "eval", "predict", "serve")


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def describe(parser: argparse.ArgumentParser) -> list[dict]:
    """Every argument of ``parser`` (help excluded) as a plain dict, in order."""
    group_of = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        out.append({
            "flags": list(a.option_strings) or [a.dest], "dest": a.dest, "default": _plain(a.default),
            "choices": _plain(list(a.choices)) if a.choices is not None else None,
            "action": type(a).__name__, "nargs": a.nargs, "required": a.required,
            "metavar": a.metavar, "group": group_of.get(id(a)),
        })
    return out


def snapshot() -> dict[str, list[dict]]:
    from softprompt.cli import build_parser

    subs = build_parser().get_default("subcommands")
    return {name: describe(subs[name]) for name in COMMANDS}


if __name__ == "__main__":  # record: PYTHONPATH=src:tests python tests/flagkit.py
    snap = snapshot()
    lines = ",\n".join(f"  {json.dumps(name)}: [\n" + ",\n".join("    " + json.dumps(a) for a in args) + "\n  ]"
                       for name, args in snap.items())
    FIXTURE.write_text("{\n" + lines + "\n}\n")
