"""Learning curves: dev quality against steps and against training seconds, one long run per method
and task, evaluated on dev every few steps, for softprompt's input prompt, deep prompt and residual
prompt and PEFT LoRA r=8; then each method's dev score at the wall-clock LoRA r=8 needs for 100 steps.

Training seconds exclude the dev evaluations on both sides (softprompt: the sum of its step times
from metrics.jsonl; PEFT: the timed part of its loop), so the curves compare training cost alone.
Dev scores: rank classification (summed label log-probs) through softprompt's scorer for the
prompts and through PEFT's own forward for LoRA (the same quantity; bench/peft_side.py); for
generation (headlines), greedy decoding and ROUGE-L / chrF through softprompt's scorer on both sides
(LoRA: its adapter active on the base model, unmerged, so that training goes on).

Run (two at a time on 2 cores, OMP_NUM_THREADS=1):
    .venv/bin/python bench/learning_curves.py --task tweet-sentiment --methods prompt,prefix --steps 400
    .venv/bin/python bench/learning_curves.py --task tweet-sentiment --methods lora --steps 200
    .venv/bin/python bench/learning_curves.py --task headlines --methods prefix-lr01,prompt --dev-n 100
Writes results/learning_curves_TASK.json/.md (runs accumulate by method) and a PNG per task.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import CURVE_METRICS, RESULTS, add_peft_precision, machine, markdown_table, metrics_of, rank, set_threads

import peft_side
from tasks import TASKS, TaskData, load_task, sample, train_fields

from softprompt import load_base_model
from softprompt.base import wrap_base_model
from softprompt.evaluate import classification_metrics, evaluate_prompt
from softprompt.model import PromptedModel

SOFTPROMPT_METHODS = {"prompt": {}, "prefix": {"method": "prefix"}, "prefix-lr01": {"method": "prefix", "lr": 0.01},
                    "prefix-scaled": {"method": "prefix", "reparam": "scaled"},
                      "residual": {"reparam": "residual"},
                      # input-prompt levers (issue #26: the input prompt on noisy data)
                      "prompt-lr03": {"lr": 0.3}, "prompt-lr003": {"lr": 0.03}, "prompt-len100": {"prompt_length": 100},
                      "prompt-fp32": {"precision": "fp32"}}
"""Method -> TrainConfig fields over the defaults."""
METHODS = (*SOFTPROMPT_METHODS, "lora")
LORA_STEPS_REF = 100
"""The equal-wall-clock budget: what LoRA r=8 needs for this many steps."""


def run_softprompt(data: TaskData, args, method: str, base, dev_n: int | None = None):
    """One softprompt training run of ``method`` on the task (a dev sample of ``dev_n`` rows
    evaluated every ``args.eval_every`` steps when given); the TrainResult."""
    from softprompt.examples import jsonl_bytes
    from softprompt.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        kind = data.spec.kind
        (work / "train.jsonl").write_bytes(jsonl_bytes(data.train, kind))
        dev = {}
        if dev_n:
            (work / "dev.jsonl").write_bytes(jsonl_bytes(sample(data, "dev", dev_n), kind))
            dev = {"eval": str(work / "dev.jsonl"), "eval_every": args.eval_every}
        cfg = TrainConfig(data=str(work / "train.jsonl"), **train_fields(data.spec),
                          out=str(work / "p.safetensors"), max_steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, seed=getattr(args, "seed", 0), quiet=True, checkpoint_every=0,
                          patience=None, model=args.model, **dev, **SOFTPROMPT_METHODS[method])
        return train(cfg, base=base)


def step_seconds(result, batch_size: int) -> dict[int, float]:
    """Step -> that step's training seconds (dev evaluation excluded), from metrics.jsonl."""
    return {r["step"]: batch_size / r["examples_per_s"] for r in result.history if "loss" in r}


def softprompt_curve(data: TaskData, args, method: str, base) -> list[dict]:
    """One softprompt run, dev-evaluated every ``args.eval_every`` steps; [{step, seconds, *CURVE_METRICS}]."""
    result = run_softprompt(data, args, method, base, args.dev_n)
    per_step = step_seconds(result, args.batch_size)
    seconds, at, out = 0.0, {}, []
    for step in sorted(per_step):
        seconds += per_step[step]
        at[step] = seconds
    keys = CURVE_METRICS[data.spec.kind]
    for r in result.history:
        if "eval" in r:
            m = next(iter(r["eval"].values()))
            out.append({"step": r["step"], "seconds": round(at[r["step"]], 2), **{k: m[k] for k in keys}})
    return out


def lora_dev_metrics(model, tok, data: TaskData, dev) -> dict:
    """Dev metrics of a PEFT LoRA model in the middle of training: rank classification through PEFT's
    own forward, or greedy generation through softprompt's scorer on the base model with the adapter
    active (unmerged; ``wrap_base_model`` freezes the model, so the adapter is made trainable again)."""
    if data.spec.kind == "classify":
        scores = peft_side.peft_classify_scores(model, tok, data.spec, [e.source for e in dev])  # (N, C)
        pred = [data.spec.labels[i] for i in scores.argmax(-1).tolist()]
        return classification_metrics([e.target for e in dev], pred, data.spec.labels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        base = wrap_base_model(model.get_base_model(), tok, "lora")
        return evaluate_prompt(PromptedModel(base), None, data.spec, dev, 16)  # decodes the spec's target length, as softprompt's dev evaluation does
    finally:
        for p in trainable:
            p.requires_grad_(True)


def lora_curve(data: TaskData, args) -> list[dict]:
    """One PEFT LoRA r=8 run (lr 1e-3, the quality benchmark's recipe), dev-evaluated every ``args.eval_every`` steps."""
    lm, tok, _ = peft_side.load_hf(args.model)
    model = peft_side.peft_lora(lm)
    dev = sample(data, "dev", args.dev_n)
    out: list[dict] = []

    def on_step(step: int, run) -> None:
        if step % args.eval_every and step != args.steps:
            return
        m = lora_dev_metrics(model, tok, data, dev)
        out.append({"step": step, "seconds": round(sum(run.step_seconds), 2),
                    **{k: m[k] for k in CURVE_METRICS[data.spec.kind]}})

    peft_side.train_peft(model, tok, data.spec, data.train, args.steps, args.batch_size,
                         lr=peft_side.LEARNING_RATES["lora"], seed=args.seed, on_step=on_step,
                         precision=args.peft_precision)
    return out


def at_seconds(curve: list[dict], budget: float) -> dict | None:
    """The best dev point reached within ``budget`` training seconds (what --max-time keeps), or None (pure)."""
    inside = [p for p in curve if p["seconds"] <= budget]
    return max(inside, key=rank) if inside else None


def seconds_at_step(curve: list[dict], step: int) -> float | None:
    """Training seconds a run took for ``step`` steps, interpolated between its evaluated steps
    (a step's cost is about constant); None if the run stopped before ``step`` (pure)."""
    pts = [(0, 0.0)] + [(p["step"], p["seconds"]) for p in curve]
    for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
        if s0 <= step <= s1 and s1 > s0:
            return round(t0 + (t1 - t0) * (step - s0) / (s1 - s0), 2)
    return None


def equal_wall_clock(curves: dict[str, list[dict]]) -> list[dict]:
    """Each method's best dev point within the seconds LoRA r=8 took for LORA_STEPS_REF steps (pure)."""
    budget = seconds_at_step(curves.get("lora", []), LORA_STEPS_REF)
    if budget is None:
        return []
    rows = []
    for method, curve in curves.items():
        p = at_seconds(curve, budget)
        if p:
            rows.append({"method": method, "budget_s": budget, "step": p["step"], "seconds": p["seconds"],
                         **{f"dev_{k}": p[k] for k in sorted(metrics_of(p))}})
    return rows


def plot(task: str, curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metric = "macro_f1"
    for method, curve in curves.items():
        metric = metrics_of(curve[0])[0] if curve else metric
        for ax, x in zip(axes, ("step", "seconds")):
            ax.plot([p[x] for p in curve], [p[metric] for p in curve], marker="o", ms=3, label=method)
    axes[0].set_xlabel("optimizer steps (batch 8)")
    axes[1].set_xlabel("training seconds (dev evaluation excluded)")
    for ax in axes:
        ax.set_ylabel({"macro_f1": "dev macro-F1", "rouge_l": "dev ROUGE-L"}[metric])
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(f"{task}: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--dev-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=1)
    add_peft_precision(ap)
    args = ap.parse_args()
    set_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    name = args.name or f"learning_curves_{args.task.replace('-', '_')}"
    data = load_task(args.task, args.max_length)
    path = RESULTS / f"{name}.json"
    base = load_base_model(args.model) if any(m != "lora" for m in methods) else None
    for m in methods:
        t0 = time.perf_counter()
        curve = lora_curve(data, args) if m == "lora" else softprompt_curve(data, args, m, base)
        run = {"machine": machine(), "steps": args.steps, "eval_every": args.eval_every, "seed": args.seed,
               "wall_s": round(time.perf_counter() - t0, 1)}
        print(m, curve[-1], flush=True)
        # re-read before writing: another process may have added a method to the same file meanwhile
        old = json.loads(path.read_text()) if path.is_file() else {}
        curves, runs = {**old.get("curves", {}), m: curve}, {**old.get("runs", {}), m: run}
        path.write_text(json.dumps({"task": args.task, "curves": curves, "runs": runs,
                                    "equal_wall_clock": equal_wall_clock(curves)}, indent=2) + "\n")
    eq = equal_wall_clock(curves)
    md = [f"## {name}", "", f"Task {args.task}, dev {args.dev_n} rows, batch {args.batch_size}, seed per run in the JSON.", ""]
    for m, r in runs.items():
        md.append(f"- {m}: {r['machine']['cpu']}, {r['machine']['torch_threads']} thread(s), {r['machine']['date']}, "
                  f"load {r['machine']['load_average_1min']}")
    md += ["", markdown_table([{"method": m, **p} for m, c in curves.items() for p in c[-1:]]), ""]
    if eq:
        md += [f"Equal wall-clock (LoRA r=8's {LORA_STEPS_REF} steps):", "", markdown_table(eq)]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    plot(args.task, curves, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
