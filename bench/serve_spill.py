"""``softprompt serve`` that also takes ``--prefix-spill-mb MB`` and ``--prefix-spill-dir DIR``, for
benchmarks run before those flags are in the CLI: ``EngineConfig`` has the fields, and the flags
come with the change that declares the CLI from the settings dataclasses. The two options are
taken off the command line and set on the engine settings (validated as the flags would be);
every other argument is ``softprompt serve``'s. Once ``softprompt serve --prefix-spill-mb`` exists,
pass it directly and delete this file.

Run: python bench/serve_spill.py serve --prompts DIR --prefix-spill-mb 2048 [serve's options]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from softprompt import cli
from softprompt.commands import serve


def main() -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--prefix-spill-mb", type=float, default=None)
    own.add_argument("--prefix-spill-dir", default=None)
    spill, rest = own.parse_known_args(sys.argv[1:])
    built = serve.config_from_args

    def config_from_args(args):
        config = built(args)
        config.engine = dataclasses.replace(config.engine, prefix_spill_mb=spill.prefix_spill_mb,
                                            prefix_spill_dir=spill.prefix_spill_dir)
        return config

    serve.config_from_args = config_from_args
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
