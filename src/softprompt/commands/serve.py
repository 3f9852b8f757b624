"""``softprompt serve``: serve every prompt of a folder on one base model over HTTP."""

from __future__ import annotations

import argparse
import signal
import sys

from ..config_flags import add_config_flags
from ..config_flags import config_from_args as config_from
from ..extras import require
from ..serve.config import ServeConfig


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve many prompts on one base model over HTTP",
        description="Serve the prompt files of a folder on one frozen base model: mixed-task batching, "
        "cached prompt prefixes, classify/generate endpoints, run-time prompt loading.",
    )
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Build and validate the settings (raises ConfigError naming the flag)."""
    return config_from(ServeConfig, args)


def run(args: argparse.Namespace) -> int:
    require("serve", "softprompt serve")
    from ..serve.http import run_server
    from ..serve.engine import create_engine

    config = config_from_args(args)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; as SystemExit it unwinds
    # through run_server's cleanup, which stops the engine and a vLLM server it launched
    # (the default action would end the process there and orphan that server).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    engine = create_engine(config)
    names = engine.bank.names()
    shown = f" ({', '.join(names)})" if 0 < len(names) <= 20 else ""
    cache = f"; prefix cache {engine.bank.stats().limit / (1 << 20):.0f} MB"

    def ready(url: str) -> None:
        print(f"serving {len(names)} prompt(s) on {engine.backend.describe} at {url}{shown}{cache}; "
              f"docs at {url}/docs", file=sys.stderr)

    run_server(config, engine, on_ready=ready)
    return 0
