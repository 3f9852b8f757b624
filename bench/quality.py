"""Quality at an equal training budget: softprompt's default recipe vs PEFT prompt tuning vs PEFT
LoRA, the same number of steps x batch size, plus the prompting baselines (bare model, hand-written
instruction, plain and in the chat template, few-shot) and TF-IDF + logistic regression, on one task
per invocation.

Every method is scored by the same code: rank classification (summed label-token log-probs over
the label set) or greedy generation + ROUGE-L, through ``softprompt.evaluate``. A PEFT prompt is
its trained (P, d) virtual-token embeddings (PEFT prepends exactly those rows; the run checks that
PEFT's own forward gives the same label scores); a LoRA model is merged and scored with no prompt.

Results accumulate in ``results/quality_TASK.json`` keyed by (method, seed), so a long comparison
can be split over several invocations (``--methods``, ``--seeds``) that each stay within ~15 min.

Run: .venv/bin/python bench/quality.py --task bbc-news --methods softprompt,baselines --seeds 0,1,2
     .venv/bin/python bench/quality.py --task bbc-news --methods peft-pt --seeds 0
     .venv/bin/python bench/quality.py --task tweet-sentiment --model DIR --steps 2 --eval-n 8 --name smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, add_peft_precision, set_threads, write_results

import peft_side
from tasks import NAMES, TASKS, TaskData, load_task, sample, train_fields

from softprompt import load_base_model
from softprompt.base import wrap_base_model
from softprompt.evaluate import PRIMARY_METRIC, evaluate_prompt
from softprompt.model import PromptedModel
from softprompt.scoring import classify_scores

VARIANTS: dict[str, dict] = {
    "softprompt": {},
    "softprompt-plain": {"class_weights": "none", "sampling": "uniform", "select_metric": "accuracy"},
    "softprompt-weighted": {"class_weights": "balanced", "sampling": "uniform", "select_metric": "accuracy"},
    "softprompt-sampled": {"class_weights": "none", "sampling": "balanced", "select_metric": "accuracy"},
    "softprompt-f1": {"class_weights": "none", "sampling": "uniform", "select_metric": "macro_f1"},
    "softprompt-weighted-f1": {"class_weights": "balanced", "sampling": "uniform", "select_metric": "macro_f1"},
    "softprompt-sampled-f1": {"class_weights": "none", "sampling": "balanced", "select_metric": "macro_f1"},
    "softprompt-prefix": {"method": "prefix"},
    "softprompt-residual": {"reparam": "residual"},
    "softprompt-calibrated": {"calibrate": "auto"},
    "softprompt-prefix-lr01": {"method": "prefix", "lr": 0.01},
    "softprompt-prefix-lr01-calibrated": {"method": "prefix", "lr": 0.01, "calibrate": "auto"},
}
"""softprompt's recipes: TrainConfig fields over the defaults (``softprompt``: the defaults as they are)."""
METHODS = (*VARIANTS, "peft-pt", "peft-prefix", "lora", "baselines")
TITLES = {
    "softprompt": "softprompt (default recipe)",
    "softprompt-plain": "softprompt, no class handling (recipe before #14)",
    "softprompt-weighted": "softprompt --class-weights balanced",
    "softprompt-sampled": "softprompt --sampling balanced",
    "softprompt-f1": "softprompt --select-metric macro_f1",
    "softprompt-weighted-f1": "softprompt --class-weights balanced --select-metric macro_f1",
    "softprompt-sampled-f1": "softprompt --sampling balanced --select-metric macro_f1",
    "softprompt-prefix": "softprompt --method prefix (deep prompt)",
    "softprompt-residual": "softprompt --reparam residual",
    "softprompt-calibrated": "softprompt --calibrate auto",
    "softprompt-prefix-lr01": "softprompt --method prefix --lr 0.01",
    "softprompt-prefix-lr01-calibrated": "softprompt --method prefix --lr 0.01 --calibrate auto",
    "peft-prefix": "PEFT prefix tuning (20 virtual tokens)",
    "peft-pt": "PEFT prompt tuning",
    "lora": "PEFT LoRA r=8 (q,v)",
    "bare": "bare model (no prompt)",
    "instruction": "hand-written instruction",
    "instruction-chat": "hand-written instruction, chat template",
    "few-shot": "few-shot (5 shots)",
    "tfidf-lr": "TF-IDF + logistic regression (not a prompt)",
}
TRAINED = (*VARIANTS, "peft-pt", "peft-prefix", "lora")
PROMPTING = ("bare", "instruction", "instruction-chat", "few-shot")
"""The baselines a prompt engineer would try (TF-IDF is not a prompt)."""


def scores_only(m: dict) -> dict:
    """Metrics without predictions / per-class detail (what the JSON keeps)."""
    keep = ("accuracy", "macro_f1", "log_loss", "rouge_l", "chrf", "exact_match", "n")
    return {k: m[k] for k in keep if k in m}


def gen_kw(data: TaskData, max_new_tokens: int) -> dict:
    return {"max_new_tokens": max_new_tokens} if data.spec.kind == "generate" else {}


def variant_fields(method: str) -> dict:
    """The TrainConfig fields of recipe ``method``; a clear exit when this checkout's TrainConfig
    lacks one (``method`` / ``reparam`` arrive with deep prompts)."""
    from dataclasses import fields  # noqa: PLC0415

    from softprompt.train import TrainConfig  # noqa: PLC0415

    known = {f.name for f in fields(TrainConfig)}
    missing = sorted(set(VARIANTS[method]) - known)
    if missing:
        raise SystemExit(f"{method}: this softprompt's TrainConfig has no field(s) {missing}; "
                         "that recipe needs a softprompt that has them")
    return VARIANTS[method]


def run_softprompt(data: TaskData, args, seed: int, base, test, method: str = "softprompt") -> dict:
    """softprompt's recipe ``method`` (:data:`VARIANTS`) through its real training path
    (``softprompt.train.train``: dev-set evaluation 5 times, best prompt kept, early stopping), then
    the shared scorer on the saved prompt file, as a user would load it."""
    from softprompt.artifact import load_prompt  # noqa: PLC0415
    from softprompt.calibration import biases_of  # noqa: PLC0415
    from softprompt.examples import jsonl_bytes  # noqa: PLC0415
    from softprompt.train import TrainConfig, train  # noqa: PLC0415

    extra = variant_fields(method)
    steps, every = args.plan.get(method, (args.steps, None))  # --equal-time: its own plan

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "train.jsonl").write_bytes(jsonl_bytes(sample(data, "train", args.train_n, seed=0), data.spec.kind))
        (work / "dev.jsonl").write_bytes(jsonl_bytes(sample(data, "dev", args.dev_n, seed=0), data.spec.kind))
        cfg = TrainConfig(data=str(work / "train.jsonl"), eval=str(work / "dev.jsonl"), **train_fields(data.spec),
                          out=str(work / "p.safetensors"), max_steps=steps, eval_every=every,
                          batch_size=args.batch_size, prompt_length=args.prompt_length,
                          max_length=args.max_length, seed=seed,
                          quiet=True, checkpoint_every=0, model=args.model, **extra)
        t0 = time.perf_counter()
        result = train(cfg, base=base)
        secs = time.perf_counter() - t0
        loaded = load_prompt(result.path, base)
        prompt, training = loaded.tensor, loaded.meta.training or {}  # (P, d), as stored (float16)
        biases = biases_of(loaded.meta)  # --calibrate: scored as eval/predict/serve score it
    m = evaluate_prompt(PromptedModel(base), prompt, data.spec, test, args.eval_batch, biases=biases,
                        **gen_kw(data, args.max_new_tokens))
    if biases is not None:  # the same prompt without its calibration, side by side
        raw = evaluate_prompt(PromptedModel(base), prompt, data.spec, test, args.eval_batch)
        m["uncalibrated"] = scores_only(raw)
    elif extra.get("calibrate") == "auto":
        m["uncalibrated"] = "no gain on dev: no calibration stored"
    return {**scores_only(m), "uncalibrated": m.get("uncalibrated"), "train_seconds": round(secs, 1), "steps_done": result.steps,
            "best_step": next(iter(result.best_step.values()), result.steps),
            "balance": training.get("balance"), "precision": training.get("precision"),
            "train_examples_per_s": round(result.examples_per_s, 2)}


def run_peft(data: TaskData, args, seed: int, base, test, method: str) -> dict:
    """PEFT prompt tuning, prefix tuning or LoRA, trained the PEFT way, scored with the shared scorer
    (prefix tuning: the same rank classification through PEFT's own forward)."""
    if method == "peft-prefix" and data.spec.kind != "classify":
        raise SystemExit("peft-prefix is scored by rank classification only (a classification task)")
    lm, tok, path = peft_side.load_hf(args.model)
    if method == "peft-pt":
        model = peft_side.peft_prompt_tuning(lm, path, peft_side.init_text(data.spec, NAMES[data.name]),
                                             args.prompt_length)
    elif method == "peft-prefix":
        model = peft_side.peft_prefix(lm, args.prompt_length)
    else:
        model = peft_side.peft_lora(lm)
    train = sample(data, "train", args.train_n, seed=0)
    lr = peft_side.LEARNING_RATES[{"peft-pt": "prompt-tuning", "peft-prefix": "prefix-tuning"}.get(method, "lora")]
    t0 = time.perf_counter()
    run = peft_side.train_peft(model, tok, data.spec, train, args.steps, args.batch_size, lr=lr, seed=seed,
                               log_every=max(1, args.steps // 5), precision=args.peft_precision)
    secs = time.perf_counter() - t0
    kw = gen_kw(data, args.max_new_tokens)
    extra: dict = {}
    if method == "peft-pt":
        prompt = peft_side.prompt_of(model)  # (P, d)
        pm = PromptedModel(base)
        if data.spec.kind == "classify":  # PEFT's own forward == the shared scorer on this prompt
            diffs = []
            for ex in test[:3]:
                a = peft_side.peft_label_logprobs(model, tok, data.spec, ex.source)
                b = classify_scores(pm, prompt, [data.spec.source_ids(base.tokenizer, ex.source)],
                                    data.spec.label_ids(base.tokenizer))[0]
                diffs.append(float((a - b).abs().max()))
            extra["peft_forward_max_abs_diff"] = max(diffs)
        m = evaluate_prompt(pm, prompt, data.spec, test, args.eval_batch, **kw)
    elif method == "peft-prefix":  # batched, padded scoring == one unpadded row per label through PEFT
        few = [e.source for e in test[:3]]
        batched = peft_side.peft_classify_scores(model, tok, data.spec, few, args.eval_batch)
        alone = torch.stack([peft_side.peft_label_logprobs(model, tok, data.spec, t) for t in few])
        extra["peft_forward_max_abs_diff"] = float((batched - alone).abs().max())
        m = peft_prefix_metrics(model, tok, data, test, args.eval_batch)
    else:
        merged = wrap_base_model(model.merge_and_unload(), tok, "lora-merged")
        m = evaluate_prompt(PromptedModel(merged), None, data.spec, test, args.eval_batch, **kw)
    return {**scores_only(m), **extra, "train_seconds": round(secs, 1), "final_loss": run.losses[-1],
            "precision": run.precision}


def peft_prefix_metrics(model, tok, data: TaskData, test, batch_size: int) -> dict:
    """Accuracy, macro-F1 and log loss of a PEFT prefix-tuning model from PEFT's own forward."""
    from softprompt.evaluate import classification_metrics  # noqa: PLC0415

    scores = peft_side.peft_classify_scores(model, tok, data.spec, [e.source for e in test], batch_size)  # (N, C)
    logp = scores.log_softmax(-1)  # over the labels, as softprompt.evaluate normalises them
    gold = [data.spec.labels.index(e.target) for e in test]
    m = classification_metrics([e.target for e in test], [data.spec.labels[i] for i in logp.argmax(-1).tolist()],
                               data.spec.labels)
    m["log_loss"] = float(-logp[torch.arange(len(gold)), gold].mean())
    return m


def run_baselines(data: TaskData, args, base, test) -> dict[str, dict]:
    from softprompt.evaluate.baselines import BaselineContext, run_baselines as run_all  # noqa: PLC0415

    ctx = BaselineContext(PromptedModel(base), data.spec, test, train=sample(data, "train", args.train_n, seed=0),
                          name=NAMES[data.name], batch_size=args.eval_batch, gen_kw=gen_kw(data, args.max_new_tokens))
    results, _ = run_all(ctx)
    return {name: {**scores_only(m), "setup": m.get("setup", "")} for name, m in results.items()}


def load_runs(path: Path, config: dict) -> list[dict]:
    """Earlier runs of the same configuration (anything else is discarded)."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old.get("runs", []) if old.get("config") == config else []


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="0", help="comma list of seeds for the trained methods")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=160, help="source tokens (template included)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="generation (headlines)")
    ap.add_argument("--train-n", type=int, default=None, help="training examples (default: the whole train split)")
    ap.add_argument("--dev-n", type=int, default=200, help="dev examples softprompt's recipe may use")
    ap.add_argument("--eval-n", type=int, default=None, help="test examples (default per task)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--name", default=None, help="results name (default quality_TASK)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    add_peft_precision(ap)
    ap.add_argument("--equal-time", default=None, metavar="STEP_COST",
                    help="give each softprompt recipe the steps and dev evaluations that fit the time LoRA r=8 takes "
                         "for --steps steps, from the step costs in results/STEP_COST.json (planned as "
                         "--max-steps auto plans: softprompt.train.budget.plan_steps)")
    args = ap.parse_args()
    set_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    for m in methods:  # a recipe this checkout cannot run says so before anything is loaded
        if m in VARIANTS:
            variant_fields(m)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.eval_n is None:
        args.eval_n = {"bbc-news": 400, "tweet-sentiment": 400, "tweet-imbalanced": 400,
                       "headlines": 60}[args.task]  # the published sizes
    name = args.name or f"quality_{args.task.replace('-', '_')}"

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    data = load_task(args.task, args.max_length)
    test = sample(data, "test", args.eval_n, seed=0)
    base = load_base_model(args.model)
    args.plan = equal_time_plan(args.equal_time, args, len(data.train), args.dev_n) if args.equal_time else {}
    config = {"task": args.task, "model": base.name, "steps": args.steps, "batch_size": args.batch_size,
              **({"equal_time": args.equal_time, "plan": args.plan} if args.equal_time else {}),
              "prompt_length": args.prompt_length, "max_length": args.max_length, "train_n": args.train_n,
              "eval_n": len(test), "max_new_tokens": args.max_new_tokens}

    def record(method: str, seed: int | None, metrics: dict) -> None:
        """Add one run and rewrite the results (merged with other invocations' runs)."""
        print(f"{method} seed {seed}: {metrics}", flush=True)
        run = {"method": method, "seed": seed, **metrics, "load": round(os.getloadavg()[0], 2)}
        runs = [r for r in load_runs(RESULTS / f"{name}.json", config) if (r["method"], r["seed"]) != (method, seed)]
        extra = {"load average at start": round(load0, 2), "seconds this invocation": round(time.perf_counter() - t_start)}
        write_table(name, config, runs + [run], data.spec.kind, args, extra)

    if "baselines" in methods:
        for bname, m in run_baselines(data, args, base, test).items():
            record(bname, None, m)
    for seed in seeds:
        for method in (m for m in TRAINED if m in methods):
            if method in VARIANTS:
                record(method, seed, run_softprompt(data, args, seed, base, test, method))
            else:
                record(method, seed, run_peft(data, args, seed, base, test, method))


STEP_COST_METHOD = {"softprompt": "prompt", "softprompt-prefix": "prefix-lr01", "softprompt-prefix-lr01": "prefix-lr01",
                    "softprompt-calibrated": "prompt", "softprompt-prefix-lr01-calibrated": "prefix-lr01"}
"""quality.py recipe -> its row in a step_cost results file (bench/step_cost.py)."""


def equal_time_plan(step_cost: str, args, n_train: int, n_dev: int) -> dict[str, list[int]]:
    """Recipe -> (steps, eval_every) that fit LoRA's ``args.steps`` steps of time on the machine the
    step costs were measured on: what ``--max-steps auto --max-time <LoRA's time>`` plans there
    (its dev evaluations included), independent of the load while this run trains."""
    from softprompt.train.budget import auto_plan, dev_eval_seconds  # noqa: PLC0415

    rows = {r["method"]: r["median_s_per_step"] for r in json.loads((RESULTS / f"{step_cost}.json").read_text())["rows"]}
    budget = rows["lora"] * args.steps
    # lists, not tuples: the config holding the plan is compared with its JSON copy
    plan = {recipe: list(auto_plan(budget, rows[row], dev_eval_seconds(n_dev, args.batch_size, rows[row]), n_train,
                                         args.batch_size, None))
            for recipe, row in STEP_COST_METHOD.items() if row in rows}
    print(f"equal time ({step_cost}: LoRA {rows['lora']} s a step x {args.steps} = {budget:.0f} s): {plan}", flush=True)
    return plan


def write_table(name: str, config: dict, runs: list[dict], kind: str, args, extra: dict) -> None:
    """results/NAME.json (config, every run) and NAME.md (mean, std, min, max per method)."""
    metric = PRIMARY_METRIC[kind]
    order = [*VARIANTS, "peft-pt", "peft-prefix", "lora", *PROMPTING, "tfidf-lr"]
    rows, stats = [], {}
    for method in order:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        vals = stats[method] = [r[metric] for r in mine]
        f1 = {"macro-F1": statistics.mean(r["macro_f1"] for r in mine)} if kind == "classify" else {}
        rows.append({"method": TITLES[method], metric: statistics.mean(vals), **f1, "std": spread(vals),
                     "min": min(vals), "max": max(vals), "seeds": len(vals) if method in TRAINED else "-",
                     "train s (mean)": statistics.mean(r["train_seconds"] for r in mine) if method in TRAINED else None})
    summary: dict = {"metric": metric}
    if "softprompt" in stats:
        sp = stats["softprompt"]
        for other in ("peft-pt", "lora", *PROMPTING):
            if other in stats:
                o = stats[other]
                summary[f"softprompt - {other}"] = statistics.mean(sp) - statistics.mean(o)
                if other == "peft-pt":
                    summary["beats PEFT beyond seed spread"] = (
                        min(sp) > max(o) and statistics.mean(sp) - statistics.mean(o) > 2 * (spread(sp) + spread(o)))
        prompting = [b for b in PROMPTING if b in stats]
        if prompting:
            summary["beats every prompting baseline"] = all(min(sp) > max(stats[b]) for b in prompting)
    summary.update(extra)
    notes = (f"Task {config['task']}: {config['eval_n']} test examples, {metric}; trained methods: {config['steps']} "
             f"steps x batch {config['batch_size']}, {config['prompt_length']} virtual tokens for the prompt methods, "
             f"sources cut to {config['max_length']} tokens. softprompt: its default recipe (`softprompt.train`, dev "
             f"set of {args.dev_n} for its evaluations / best prompt). PEFT prompt tuning: TEXT init from a task "
             "description, AdamW lr 3e-2, linear decay (PEFT's guide). LoRA: r=8, alpha 16, dropout 0.05 on "
             "q_proj/v_proj, AdamW lr 1e-3. PEFT prefix tuning: 20 virtual tokens, random init, lr 1e-2, scored through "
             "PEFT's forward. softprompt --class-weights/--sampling/--select-metric rows: README 'Imbalanced labels'; "
             "macro-F1 = mean per-class F1 on the test set. Baselines: `softprompt.evaluate.baselines` (deterministic; seed 0). std = standard "
             "deviation over seeds; beyond seed spread = every softprompt seed above every PEFT seed and the mean gap "
             "above twice the summed stds.")
    precisions = sorted({f"{TITLES[r['method']]}: {r['precision']}" for r in runs if r.get("precision")})
    if precisions:
        notes += f" Training precision (resolved on this machine): {'; '.join(precisions)}."
    if config.get("equal_time"):
        notes += (f" EQUAL TIME: each softprompt recipe ran the (steps, eval every) of {config['plan']}, what "
                  f"--max-steps auto plans within the time LoRA takes for {config['steps']} steps by the step costs "
                  f"in {config['equal_time']}.json (dev evaluations included in softprompt's time, not in LoRA's).")
    write_results(name, rows, summary, notes=notes)
    info = json.loads((RESULTS / f"{name}.json").read_text())
    info["config"], info["runs"] = config, runs
    (RESULTS / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")

if __name__ == "__main__":
    main()
