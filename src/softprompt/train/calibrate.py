"""``--calibrate``: fit each classification task's label biases on its dev set with the best prompt,
at the end of a run (softprompt.calibration does the fitting; this file only gathers the dev scores).

Not here: the fit and its application (calibration.py), the prompt file (artifact/).
"""

from __future__ import annotations

import torch

from ..calibration import METRICS, Calibration, fit
from ..evaluate import score_classification
from ..precision import autocast
from ..tasks import task


def fit_calibrations(run, state) -> list[Calibration | None]:
    """Per task: the fitted calibration, or None (--calibrate none, no dev set, generation, a select
    metric it cannot fit, or no gain on dev: ``auto`` keeps only a fit that raises the dev metric)."""
    out: list[Calibration | None] = []
    m = run.model
    for i, t in enumerate(run.tasks):
        metric = run.balance[i].select_metric
        if run.config.calibrate == "none" or not t.dev or not task(t.spec.kind).labelled or metric not in METRICS:
            out.append(None)
            continue
        with torch.no_grad(), autocast(m.device, m.amp):
            logp = score_classification(m.pm, state.best_prompts[i].detach(), t.spec, [e.source for e in t.dev],
                                        run.config.eval_batch_size)  # (N, C)
        cal = fit(logp, [t.spec.labels.index(e.target) for e in t.dev], metric)
        out.append(cal if cal.dev_after > cal.dev_before else None)
    return out
