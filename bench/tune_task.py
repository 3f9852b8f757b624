"""`softprompt tune` on a benchmark task, as a user runs it: the task's train split and a dev sample
written as JSONL, `softprompt tune --budget ...` (one process), then `softprompt eval` of the winner on
the test split. Records every trial, the winner and its test scores, per seed.

Run (one process, one thread; the machine may be shared: its load is recorded):
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune_task.py --task tweet-sentiment --budget 10m --trials 4
At LoRA r=8's training time (its mean training time for 100 steps in a bench/quality.py results file
measured on the same machine, or by a bench/step_cost.py file), 3 seeds:
    .venv/bin/python bench/quality.py --task tweet-sentiment --methods lora --seeds 0,1,2 --threads 1 --name quality_lora_T
    .venv/bin/python bench/tune_task.py --task tweet-sentiment --equal-time quality_lora_T --seeds 0,1,2
Writes results/NAME.json/.md (default NAME tune_TASK, TASK with _ for -), keeps each seed's prompt and
trials under results/NAME/seedS/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, markdown_table
from tasks import TASKS, load_task, sample, train_fields

from softprompt.evaluate.baselines import PROMPT_ROW
from softprompt.examples import jsonl_bytes

LORA_STEPS = 100
"""--equal-time: the budget is the time LoRA r=8 takes for this many steps (bench/quality.py's --steps)."""


def _softprompt(argv: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    print("$ softprompt " + shlex.join(argv), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "softprompt", *argv], env=env, check=True, text=True,
                          stdout=subprocess.PIPE)


def lora_budget(source: str) -> float:
    """Seconds LoRA r=8 takes for LORA_STEPS steps (pure read): the mean training time of its runs in a
    bench/quality.py results file (``quality_*``: LoRA's own measured time, the issue's definition), or
    LORA_STEPS x the median step of a bench/step_cost.py file (a short probe: LoRA's real runs took
    longer, 202 s where 100 x its median step is 159 s on the Xeon)."""
    info = json.loads((RESULTS / f"{source}.json").read_text())
    if "runs" in info:
        secs = [r["train_seconds"] for r in info["runs"] if r["method"] == "lora"]
        if not secs:
            raise SystemExit(f"{source}.json has no lora run")
        return round(sum(secs) / len(secs), 1)
    rows = {r["method"]: r for r in info["rows"]}
    if "lora" not in rows:
        raise SystemExit(f"{source}.json has no lora row")
    return round(LORA_STEPS * rows["lora"]["median_s_per_step"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tweet-sentiment", choices=TASKS)
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--equal-time", default=None, metavar="RESULTS",
                    help=f"budget = LoRA r=8's time for {LORA_STEPS} steps: its mean training time in a "
                         "bench/quality.py results file, or by a bench/step_cost.py file (overrides --budget)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--methods", default=None, help="tune's --methods (default: tune's own)")
    ap.add_argument("--calibrate", default="auto", choices=["auto", "none"])
    ap.add_argument("--dev-n", type=int, default=200, help="dev examples (as bench/quality.py: its seed-0 sample)")
    ap.add_argument("--eval-n", type=int, default=None, help="test examples (default: bench/quality.py's: 400, 60 headlines)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="generation (headlines), as bench/quality.py")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--seeds", default="0", help="comma list: one search per seed (--seed of tune)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--name", default=None, help="results name (default tune_TASK; smoke_* is git-ignored)")
    ap.add_argument("--markdown-only", action="store_true", help="re-render results/NAME.md from its JSON, no run")
    args = ap.parse_args()
    name = args.name or f"tune_{args.task.replace('-', '_')}"
    if args.markdown_only:
        return write_markdown(name, json.loads((RESULTS / f"{name}.json").read_text()))
    budget = str(lora_budget(args.equal_time)) if args.equal_time else args.budget
    if args.eval_n is None:
        args.eval_n = 60 if args.task == "headlines" else 400

    data = load_task(args.task, max_length=args.max_length)
    work = RESULTS / name
    work.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", data.train), ("dev", sample(data, "dev", args.dev_n, seed=0)),
                        ("test", sample(data, "test", args.eval_n, seed=0))):
        (work / f"{split}.jsonl").write_bytes(jsonl_bytes(rows, data.spec.kind))
    start = machine()
    runs = [_run_seed(args, data, work, budget, int(seed)) for seed in args.seeds.split(",")]
    result = {"task": args.task, "machine_start": start, "machine_end": machine(), "args": vars(args),
              "budget": float(budget) if args.equal_time else budget, "runs": runs,
              "train_examples": len(data.train), "dev_examples": min(args.dev_n, len(data.dev)),
              "test_examples": min(args.eval_n, len(data.test))}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(name, result)


def _run_seed(args, data, work: Path, budget: str, seed: int) -> dict:
    """One search and the test evaluation of its winner."""
    out = work / f"seed{seed}" / "prompt.safetensors"
    fields = train_fields(data.spec)
    task_argv = (["--task", "generate", "--max-target-length", str(fields["max_target_length"])]
                 if fields["task"] == "generate" else ["--labels", ",".join(fields["labels"])])
    tune_argv = ["tune", "--data", str(work / "train.jsonl"), "--eval", str(work / "dev.jsonl"),
                 "--template", data.spec.template, *task_argv,
                 "--max-length", str(args.max_length), "--budget", budget, "--trials", str(args.trials),
                 "--calibrate", args.calibrate, "--seed", str(seed), "--out", str(out)]
    tune_argv += (["--methods", args.methods] if args.methods else []) + (["--model", args.model] if args.model else [])
    t0 = time.perf_counter()
    _softprompt(tune_argv, args.threads)
    tune_s = time.perf_counter() - t0
    gen = ["--max-new-tokens", str(args.max_new_tokens)] if fields["task"] == "generate" else []
    evaluated = json.loads(_softprompt(["eval", str(out), "--data", str(work / "test.jsonl"), "--json", "--quiet", *gen]
                                       + (["--model", args.model] if args.model else []), args.threads).stdout)
    test = {**evaluated["results"][PROMPT_ROW], "n": evaluated["n"]}
    trials = [json.loads(l) for l in (out.parent / "prompt.run" / "trials.jsonl").read_text().splitlines() if l.strip()]
    info = json.loads(_softprompt(["inspect", str(out), "--json"], args.threads).stdout)
    return {"seed": seed, "command": "softprompt " + shlex.join(tune_argv), "tune_seconds": round(tune_s, 1),
            "search": info["training"]["search"], "calibration": info.get("calibration"), "trials": trials,
            "test": {k: test[k] for k in ("accuracy", "macro_f1", "rouge_l", "n") if k in test}}


def _precision(m: dict) -> str:
    """What ``--precision auto`` (tune's default) ran in on the machine ``m`` (bench/common.py's machine())."""
    if m.get("cpu_native_bf16"):
        return f"bf16 autocast (native bf16: {', '.join(m.get('cpu_bf16_flags', []))})"
    return "fp32 (no native bf16)"


def write_markdown(name: str, result: dict) -> None:
    """results/NAME.md from the JSON result (``--markdown-only`` re-renders it without a run). A result
    of one search from before ``--seeds`` (no "runs") reads as one run."""
    runs = result.get("runs") or [{**result, "seed": result["args"].get("seed", 0)}]
    m0, m1 = result["machine_start"], result["machine_end"]
    md = [f"## {name}", "",
          f"Machine: {m0['cpu']}, {m0['cores']} cores, torch {m0['torch']}, {result['args']['threads']} thread, "
          f"{_precision(m0)}; {m0['date']}; load average {m0['load_average_1min']} at the start, "
          f"{m1['load_average_1min']} at the end (the machine may have been shared with other runs).", "",
          f"`{' '.join(runs[0]['command'].split())}` ({result['train_examples']} train / {result['dev_examples']} dev "
          f"examples), then `softprompt eval` on {result['test_examples']} test examples (bench/quality.py's seeded "
          "sample)" + (f"; budget = LoRA r=8's time for {LORA_STEPS} steps by {result['args']['equal_time']}.json"
                       if result["args"].get("equal_time") else "") + ".", ""]
    summary = []
    for run in runs:
        search, test = run["search"], run["test"]
        md += [f"### seed {run['seed']}", "", markdown_table([_trial_row(t) for t in run["trials"]]),
               f"Winner: trial {search['best_trial']} ({search['best']['method']}, lr {search['best']['lr']:.3g}), dev "
               f"{search['metric']} {search['best_value']:.4f}; {search['trials']} trial(s) ({search['pruned']} pruned) "
               f"in {search['seconds']:.0f} s of a {search['budget']:.0f} s budget (stopped by {search['stopped_by']})"
               f"{'; calibrated' if run.get('calibration') else ''}. **Test "
               + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "n") + ".**", ""]
        summary.append({"seed": run["seed"], "winner": search["best"]["method"], "trials": search["trials"],
                        "steps": sum(t["steps"] for t in run["trials"]), "search s": round(search["seconds"]),
                        "calibrated": bool(run.get("calibration")), **{k: v for k, v in test.items() if k != "n"}})
    if len(runs) > 1:
        scores = [k for k in ("accuracy", "macro_f1", "rouge_l") if k in summary[0]]
        summary.append({"seed": "mean", **{k: round(statistics.mean(r[k] for r in summary), 4) for k in scores}})
    md[len(md):] = ["### Summary", "", markdown_table(summary)] if len(runs) > 1 else []
    if "runs" not in result:  # the first run's own caveat
        steps = [t["steps"] for t in runs[0]["trials"]]
        md += [f"Each trial ran {min(steps)}-{max(steps)} steps of batch 8: far fewer than the 100 steps of the default "
               "recipe in quality_tweet_sentiment.md (0.569 accuracy on another machine, an Intel Xeon), so this says how "
               "the search spends a short budget on a loaded CPU, not how good its recipe is at convergence."]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _trial_row(t: dict) -> dict:
    return {"trial": t["number"], "method": t["params"]["method"], "lr": t["params"]["lr"], "state": t["state"],
            f"dev {t['metric']}": t["value"], "best step": t["best_step"], "steps": t["steps"],
            "planned": t["planned_steps"], "dev evals": len(t["evals"]), "share s": t["max_time"], "s": t["seconds"],
            "s/step": t.get("step_seconds"), "s/eval": t.get("eval_seconds"), "stopped by": t["stopped_by"]}


if __name__ == "__main__":
    main()
