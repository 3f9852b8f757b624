"""``softprompt tune``: train's flags (less those the search sets) + the search's -> :class:`TuneConfig`
-> :func:`softprompt.tune.tune`."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .train import _silence, add_flags, config_from_args

SEARCHED = ("--method", "--reparam", "--reparam-hidden", "--lr", "--max-time")
"""train flags the search sets per trial."""
ONE_RUN = ("--task-file", "--resume", "--checkpoint-every", "--launcher", "--num-processes")
"""train flags a search has no use for: one task, one process, no trial checkpoints."""
HELP = {
    "out": "where the best trial's prompt is written",
    "max_steps": "optimizer steps of every trial (default: planned per trial from the data size, its share of "
                 "--budget and the step time measured so far)",
    "run_dir": "trials.jsonl and one folder per trial (default: <out>.run/)",
    "prompt_length": "virtual tokens (the only length tried unless --prompt-lengths lists more)",
    "patience": "evaluations without improvement before a trial stops (none: off)",
    "eval_every": "evaluate every N steps (default: up to 5 times a trial, fewer where they would take over a "
                  "quarter of its time)",
}
"""train flags whose help says something else here."""


def register(sub) -> None:
    p = sub.add_parser(
        "tune", help="search the prompt method and learning rate of a task within a time budget",
        description="Search a task's recipe automatically: an Optuna study (TPE sampler seeded by --seed) tries "
                    "prompt methods (deep prompt, input prompt, residual) with learning rates from each method's "
                    "range within a wall-clock --budget, each trial a train run with an equal share of the time "
                    "left (never planned below --min-trial-steps while the budget has room), pruned on its dev "
                    "evaluations. Every trial is recorded in <run-dir>/trials.jsonl; the "
                    "best trial's prompt is written to --out with the search in its training metadata. Takes "
                    "train's flags, except those the search sets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, leave_out=SEARCHED + ONE_RUN, between=_search_flags)
    for action in p._actions:
        action.help = HELP.get(action.dest, action.help)
    p.set_defaults(func=run)


def _search_flags(p: argparse.ArgumentParser) -> None:
    from ..tune import DEFAULT_METHODS, MIN_TRIAL_STEPS, PRUNERS, SEARCH_METHODS

    s = p.add_argument_group("search")
    s.add_argument("--budget", default=None,
                   help="wall-clock time of the whole search, model loading included: seconds or 90s, 20m, 1h (required)")
    s.add_argument("--trials", type=int, default=8, help="most trials (the budget may end the search sooner)")
    s.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"recipes to try, comma-separated: {', '.join(SEARCH_METHODS)}")
    s.add_argument("--min-trial-steps", type=int, default=MIN_TRIAL_STEPS,
                   help="fewest steps a trial is planned for: a budget with room for fewer such trials than --trials "
                        "is shared between fewer, longer ones (one: the first method's known-good recipe alone)")
    s.add_argument("--prompt-lengths", default=None, help="prompt lengths to try, comma-separated, e.g. 10,20,50")
    s.add_argument("--pruner", default="median", choices=list(PRUNERS),
                   help="stop poor trials on their dev evaluations: median (below the median of earlier trials at "
                        "the same evaluation, from the 2nd), halving (successive halving), none")


def config_from(args: argparse.Namespace):
    """The :class:`TuneConfig` the flags describe (validated)."""
    from ..tune import TuneConfig

    if args.budget is None:
        raise ConfigError("--budget is required: the search's wall-clock time, e.g. 20m")
    lengths = None
    if args.prompt_lengths is not None:
        try:
            lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-lengths {args.prompt_lengths!r}: give whole numbers, comma-separated") from None
    return TuneConfig(train=config_from_args(args), budget=args.budget, trials=args.trials, methods=args.methods,
                      prompt_lengths=lengths, pruner=args.pruner,
                      min_trial_steps=args.min_trial_steps)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if config.train.quiet:
        _silence()
    from ..tune import tune

    tune(config)
    return 0
