"""Evaluation: metrics and baselines, one scoring path for all.

- ``metrics.py``    scoring a prompt on examples; classification and generation metrics; PRIMARY_METRIC
- ``baselines.py``  the bare model, instructions, few-shot, TF-IDF + logistic regression on the same examples
- ``run.py``        a prompt file on a data file, with baselines (``evaluate_file``: ``softprompt eval``)
- ``report.py``     the HTML report (plots of the comparison and the training curves)
"""

from .metrics import (PRIMARY_METRIC, classification_metrics, evaluate_prompt, generate_texts,  # noqa: F401
                      generation_metrics, score_classification)

__all__ = ["PRIMARY_METRIC", "classification_metrics", "evaluate_prompt", "generate_texts", "generation_metrics",
           "score_classification"]
