"""Evaluation: metrics and baselines, one scoring path for all.

- ``metrics.py``    scoring a prompt on examples through its task kind (``evaluate_prompt``); PRIMARY_METRIC
- ``baselines.py``  the bare model, instructions, few-shot, TF-IDF + logistic regression on the same examples
- ``compare.py``    a prompt file on a data file, with baselines (``evaluate_file``: ``softprompt eval``)
- ``report.py``     the HTML report (plots of the comparison and the training curves)

Each kind's scoring and metrics live with the kind (``softprompt.tasks.classify`` /
``softprompt.tasks.generate``); they are exported here as the evaluation API.
"""

from ..tasks.classify import classification_metrics, score_classification
from ..tasks.generate import generate_texts, generation_metrics
from .metrics import PRIMARY_METRIC, evaluate_prompt

__all__ = ["PRIMARY_METRIC", "classification_metrics", "evaluate_prompt", "generate_texts", "generation_metrics",
           "score_classification"]
