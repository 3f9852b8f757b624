"""What ``softprompt tune`` searches and how: the recipes it may try (:data:`SEARCH_METHODS`), the
pruners (:data:`PRUNERS`) and :class:`TuneConfig`, validated up front (errors name the flag).

Not here: running the study (search.py), the training settings every trial shares (train/config.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from ..errors import ConfigError
from ..methods import METHODS
from ..train.budget import parse_duration
from ..train.config import TrainConfig


@dataclass(frozen=True)
class SearchMethod:
    """One recipe the search may pick: a prompt method, its reparameterisation, its learning-rate range."""

    method: Literal["prompt", "prefix"]
    """--method of the trials that pick it."""
    reparam: Literal["mlp", "residual", "scaled"] | None
    """--reparam of those trials."""
    lr_range: tuple[float, float]
    """Learning rates drawn log-uniformly between these."""
    first_lr: float
    """The learning rate of its first trial (the recipe known to work; the search explores after)."""


SEARCH_METHODS: dict[str, SearchMethod] = {
    "prompt": SearchMethod("prompt", None, (0.01, 0.5), 0.1),
    "prefix": SearchMethod("prefix", None, (0.001, 0.3), 0.01),
    "residual": SearchMethod("prompt", "residual", (0.01, 0.5), 0.1),
    "prefix-scaled": SearchMethod("prefix", "scaled", (0.001, 0.1), 0.01),
}
"""``--methods``: input prompt (train's default recipe, lr 0.1), deep prompt (the held-out sentiment
task of issue 26 wanted lr 0.01 and more steps: its first trial), residual reparameterisation of the
input prompt (README › Deep prompts: best early on tweets at lr 0.1), deep prompt with steps relative to
each layer's key/value size (``--reparam scaled``; its lr is relative)."""
DEFAULT_METHODS: tuple[str, ...] = ("prefix", "prompt", "residual")
"""The default --methods, in the order their first trials run: the deep prompt first (ahead of or level
with the input prompt on every task measured: docs/benchmarks/quality.md), so a budget with room for
one trial trains it."""

MIN_TRIAL_STEPS = 200
"""Default --min-trial-steps. Prompts are not comparable before about 200 steps of batch 8: on the
tweet tasks' dev curves (docs/benchmarks/quality.md) the deep prompt was at 0.45-0.59 macro-F1 at step
100 and 0.60-0.63 at 200, still rising at 250-300, and the input prompt dipped between 50 and 150; on
issue 26's held-out sentiment task the deep prompt rose from 0.41 to 0.53 between steps 120 and 240.
Given LoRA's time on an Intel Xeon (bf16), a floor of 100 split the budget into two trials of about
100 steps and the winner reached dev macro-F1 0.36-0.57 on skewed tweets
(bench/results/tune_equal_time_tweet_imbalanced_xeon_amx_min100). A search of short trials ranks how
fast recipes start, not where they end."""

MEDIAN_STARTUP_TRIALS = 2
"""The median pruner prunes only once this many trials have finished."""
MEDIAN_WARMUP_EVALS = 2
"""... and never at a trial's first dev evaluation: deep prompts start slowly (issue 26)."""


def _median():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EVALS)


def _halving():
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=MEDIAN_WARMUP_EVALS)


def _nop():
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Callable[[], object]] = {"median": _median, "halving": _halving, "none": _nop}
"""``--pruner`` -> a factory of the Optuna pruner that stops a trial on its dev evaluations. A trial's
k-th dev evaluation is its Optuna step k, so trials are compared at equal fractions of their plans."""


@dataclass
class TuneConfig:
    """A search for one task's recipe. Validated on creation; errors name the CLI flag."""

    train: TrainConfig
    """What every trial shares: the train command's settings (data, dev data, template, labels, model,
    device, precision, batch, steps, select metric, calibration, ...). Each trial sets its own --method,
    --reparam, --lr, --prompt-length and --max-time; ``train.out`` is where the winner goes."""
    budget: float | str
    """Wall-clock time of the whole search (seconds, or "90s", "15m", "1h"), model loading included."""
    trials: int = 8
    """Most trials; the budget may stop the search before (each trial gets an equal share of what is left)."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Recipes to choose from (names of :data:`SEARCH_METHODS`)."""
    prompt_lengths: list[int] | None = None
    """Prompt lengths to choose from (default: only --prompt-length)."""
    pruner: Literal["median", "halving", "none"] = "median"
    """How trials are stopped early on their dev evaluations (:data:`PRUNERS`)."""
    min_trial_steps: int = MIN_TRIAL_STEPS
    """The fewest steps a trial is planned for while the budget has room: a budget that holds fewer
    such trials than --trials is shared between fewer, longer trials (one: the first recipe alone)."""

    def __post_init__(self) -> None:
        try:
            self.budget = parse_duration(self.budget)
        except ValueError as e:
            raise ConfigError(f"--budget {e}") from None
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in self.methods if m not in SEARCH_METHODS]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods {','.join(self.methods) or '(empty)'}: give distinct names of "
                              f"{', '.join(SEARCH_METHODS)}, comma-separated")
        if self.prompt_lengths is None:
            self.prompt_lengths = [self.train.prompt_length]
        if not self.prompt_lengths or not all(isinstance(n, int) and n >= 1 for n in self.prompt_lengths):
            raise ConfigError(f"--prompt-lengths must be whole numbers of at least 1, got {self.prompt_lengths}")
        steps = self.min_trial_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"--min-trial-steps must be at least 1, got {self.min_trial_steps}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        self._check_train()

    def _check_train(self) -> None:
        t = self.train
        if t.multi:
            raise ConfigError("tune searches the recipe of one task: give --data, not --task-file")
        if t.eval is None and t.eval_split is None:
            raise ConfigError("tune compares trials on dev data: give --eval FILE or --eval-split FRACTION")
        if t.max_time is not None:
            raise ConfigError("--max-time: tune gives each trial its share of --budget; drop --max-time")
        if t.resume:
            raise ConfigError("--resume: a search cannot be resumed; start it again")
        if t.reparam is not None:
            raise ConfigError("--reparam: tune picks it through --methods (residual)")
        if t.init_from is not None:
            self._check_init_from(t.init_from)

    def _check_init_from(self, path: str) -> None:
        """--init-from: every recipe searched must be able to start from the file (its method and length),
        said now rather than when a trial of another method starts."""
        from ..artifact import load_prompt
        from ..errors import PromptFileError

        try:
            meta = load_prompt(path).meta
        except PromptFileError as e:
            raise ConfigError(f"--init-from: {e}") from None
        held = METHODS[meta.method]  # a file of a method that starts from an --init can also start its reparams
        fit = [m for m in self.methods if METHODS[SEARCH_METHODS[m].method] is held
               and (held.start is None or not SEARCH_METHODS[m].reparam)]
        if fit != self.methods:
            raise ConfigError(f"--init-from {path} holds a {meta.method} prompt: search only --methods "
                              f"{','.join(fit) or meta.method} with it")
        if self.prompt_lengths != [meta.length]:
            raise ConfigError(f"--init-from {path} holds {meta.length} virtual tokens: give --prompt-length "
                              f"{meta.length} and no other --prompt-lengths")

    @property
    def name(self) -> str:
        """The task's name: --name, else --out's name without suffix (as train names it)."""
        return self.train.tasks_resolved[0].name

    def run_path(self) -> Path:
        """The search's folder (trials.jsonl, one folder per trial): --run-dir, else <out>.run/."""
        return self.train.run_path()

    def trial_config(self, number: int, method: str, lr: float, prompt_length: int, max_time: float,
                     max_steps: int | None, eval_every: int | None = None, eval_s: float = 0.0) -> TrainConfig:
        """Trial ``number``'s training settings: the shared ones with this trial's recipe and share of
        the budget; its prompt and metrics go to ``<run>/trial-NNN/``."""
        t, m = self.train, SEARCH_METHODS[method]
        folder = self.run_path() / f"trial-{number:03d}"
        fixed = t.max_steps is not None or t.epochs is not None  # --max-steps / --epochs: the user's length
        # tune's plan, re-fitted to the trial's own pace at its first dev evaluation (train/plan.py)
        planned = None if fixed else (max_steps, eval_every or t.eval_every or max_steps, eval_s)
        return dataclasses.replace(
            t, method=m.method, reparam=m.reparam, lr=lr, prompt_length=prompt_length, max_time=max_time,
            max_steps=t.max_steps if fixed else "auto", planned=planned,
            eval_every=t.eval_every or (None if fixed else eval_every), out=str(folder / "prompt.safetensors"), run_dir=str(folder), name=self.name,
            checkpoint_every=0, quiet=True, run_name=f"{t.tracker_run_name()}-trial-{number:03d}")
