"""``softprompt tune``: the automatic recipe. An Optuna study picks the prompt method, learning rate
and (optionally) prompt length of one task within a wall-clock budget, pruning trials on their dev
evaluations, and keeps the best trial's prompt.

- ``config.py``  TuneConfig, the recipes it chooses from (SEARCH_METHODS) and the pruners
- ``search.py``  ``tune()``: the study, one ``train()`` run per trial, the winner written to --out
- ``trials.py``  trials.jsonl records, the winner's choice, TuneResult

Needs the ``tune`` extra (optuna).
"""

from .config import DEFAULT_METHODS, MIN_TRIAL_STEPS, PRUNERS, SEARCH_METHODS, SearchMethod, TuneConfig
from .search import min_trial_seconds, trials_that_fit, tune
from .trials import TrialRecord, TuneResult, best_trial, read_trials

__all__ = ["TuneConfig", "TuneResult", "TrialRecord", "tune", "SEARCH_METHODS", "SearchMethod", "PRUNERS",
           "DEFAULT_METHODS", "MIN_TRIAL_STEPS", "best_trial", "read_trials", "min_trial_seconds", "trials_that_fit"]
