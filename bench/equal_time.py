"""Each method's dev scores at the training time LoRA r=8 needs for 100 steps, with the time
taken from step_cost.py's side-by-side step costs (one quiet run) rather than from the wall clock
of each long learning-curve run (those ran at different machine loads).

A method whose steps cost c seconds gets 100 x c_lora / c steps; its score there is the best dev
point learning_curves.py recorded at or before that step (what --max-time keeps: the best
prompt on dev so far). Also each method at 100 steps (equal steps).

Run (after learning_curves.py and step_cost.py for the task):
    .venv/bin/python bench/equal_time.py --task tweet-sentiment
Writes results/equal_time_TASK.json/.md.
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, markdown_table, rank

LORA_STEPS = 100


def best_until(curve: list[dict], step: float) -> dict | None:
    """The best dev point (macro-F1, then accuracy: :func:`common.rank`) at or before ``step`` (pure)."""
    inside = [p for p in curve if p["step"] <= step]
    return max(inside, key=rank) if inside else None


def rows_for(curves: dict[str, list[dict]], cost: dict[str, float]) -> list[dict]:
    """One row per method with a curve and a step cost (pure)."""
    rows = []
    for m, curve in curves.items():
        if m not in cost or "lora" not in cost:
            continue
        budget = LORA_STEPS * cost["lora"] / cost[m]  # steps this method affords in LoRA's time
        at_time, at_steps = best_until(curve, budget), best_until(curve, LORA_STEPS)
        rows.append({"method": m, "s_per_step": cost[m], "steps_in_lora_time": round(budget),
                     "curve_ends_at": curve[-1]["step"] if curve else None,
                     "equal_time_step": at_time and at_time["step"], "equal_time_acc": at_time and at_time["accuracy"],
                     "equal_time_f1": at_time and round(at_time["macro_f1"], 3),
                     "equal_steps_acc": at_steps and at_steps["accuracy"],
                     "equal_steps_f1": at_steps and round(at_steps["macro_f1"], 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--costs", default=None, help="step_cost results name (default: step_cost_TASK)")
    ap.add_argument("--curves", default=None, help="learning_curves results name (default: learning_curves_TASK), "
                    "e.g. another seed's")
    args = ap.parse_args()
    key = args.task.replace("-", "_")
    costs = args.costs or f"step_cost_{key}"
    curves_name = args.curves or f"learning_curves_{key}"
    out = f"equal_time_{key}" + (curves_name.removeprefix(f"learning_curves_{key}") if args.curves else "")
    curves = json.loads((RESULTS / f"{curves_name}.json").read_text())["curves"]
    steps = json.loads((RESULTS / f"{costs}.json").read_text())
    cost = {r["method"]: r["median_s_per_step"] for r in steps["rows"]}
    rows = rows_for(curves, cost)
    (RESULTS / f"{out}.json").write_text(json.dumps({"task": args.task, "rows": rows}, indent=2) + "\n")
    md = [f"## {out}", "",
          f"Dev scores (best so far, 200 dev rows) at the time LoRA r=8 takes for {LORA_STEPS} steps, step costs from "
          f"`{costs}` ({steps['machine']['cpu']}, {steps['machine']['date']}), curves from "
          f"`{curves_name}`. A curve that ends before its step budget is read at its end.", "",
          markdown_table(rows)]
    (RESULTS / f"{out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
