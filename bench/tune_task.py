"""`softprompt tune` on a benchmark task, as a user runs it: the task's train split and a dev sample
written as JSONL, `softprompt tune --budget ...` (one process), then `softprompt eval` of the winner on
the test split. Records every trial, the winner and its test scores.

Run (one process, one thread; the machine may be shared: its load is recorded):
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune_task.py --task tweet-sentiment --budget 10m --trials 4
Writes results/tune_TASK.json/.md (TASK with _ for -), keeps the prompt and trials under results/tune_TASK/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, markdown_table
from tasks import TASKS, load_task, sample

from softprompt.evaluate.baselines import PROMPT_ROW
from softprompt.examples import jsonl_bytes


def _softprompt(argv: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    print("$ softprompt " + shlex.join(argv), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "softprompt", *argv], env=env, check=True, text=True,
                          stdout=subprocess.PIPE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tweet-sentiment", choices=[t for t in TASKS if t != "headlines"])
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--methods", default="prompt,prefix,residual")
    ap.add_argument("--dev-n", type=int, default=200, help="dev examples (as bench/quality.py)")
    ap.add_argument("--eval-n", type=int, default=400, help="test examples (bench/quality.py's sample)")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--name", default=None, help="results name (default tune_TASK; smoke_* is git-ignored)")
    ap.add_argument("--markdown-only", action="store_true", help="re-render results/NAME.md from its JSON, no run")
    args = ap.parse_args()
    if args.markdown_only:
        name = args.name or f"tune_{args.task.replace('-', '_')}"
        return write_markdown(name, json.loads((RESULTS / f"{name}.json").read_text()))

    data = load_task(args.task, max_length=args.max_length)
    name = args.name or f"tune_{args.task.replace('-', '_')}"
    work = RESULTS / name
    work.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", data.train), ("dev", sample(data, "dev", args.dev_n, seed=args.seed)),
                        ("test", sample(data, "test", args.eval_n, seed=0))):
        (work / f"{split}.jsonl").write_bytes(jsonl_bytes(rows, "classify"))
    start = machine()
    tune_argv = ["tune", "--data", str(work / "train.jsonl"), "--eval", str(work / "dev.jsonl"),
                 "--template", data.spec.template, "--labels", ",".join(data.spec.labels),
                 "--max-length", str(args.max_length), "--budget", args.budget, "--trials", str(args.trials),
                 "--methods", args.methods, "--seed", str(args.seed), "--out", str(work / "prompt.safetensors")]
    tune_argv += ["--model", args.model] if args.model else []
    t0 = time.perf_counter()
    _softprompt(tune_argv, args.threads)
    tune_s = time.perf_counter() - t0
    evaluated = json.loads(_softprompt(["eval", str(work / "prompt.safetensors"), "--data", str(work / "test.jsonl"),
                                        "--json", "--quiet"] + (["--model", args.model] if args.model else []),
                                       args.threads).stdout)
    test = {**evaluated["results"][PROMPT_ROW], "n": evaluated["n"]}
    trials = [json.loads(l) for l in (work / "prompt.run" / "trials.jsonl").read_text().splitlines() if l.strip()]
    search = json.loads(_softprompt(["inspect", str(work / "prompt.safetensors"), "--json"],
                                    args.threads).stdout)["training"]["search"]
    result = {"task": args.task, "machine_start": start, "machine_end": machine(), "args": vars(args),
              "command": "softprompt " + shlex.join(tune_argv), "tune_seconds": round(tune_s, 1), "search": search,
              "trials": trials, "test": {k: test.get(k) for k in ("accuracy", "macro_f1", "n")},
              "train_examples": len(data.train), "dev_examples": min(args.dev_n, len(data.dev)),
              "test_examples": min(args.eval_n, len(data.test))}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(name, result)


def write_markdown(name: str, result: dict) -> None:
    """results/NAME.md from the JSON result (``--markdown-only`` re-renders it without a run)."""
    search, test, trials = result["search"], result["test"], result["trials"]
    rows = [{"trial": t["number"], "method": t["params"]["method"], "lr": t["params"]["lr"],
             "state": t["state"], f"dev {t['metric']}": t["value"], "best step": t["best_step"], "steps": t["steps"],
             "planned": t["planned_steps"], "dev evals": len(t["evals"]), "share s": t["max_time"],
             "s": t["seconds"], "s/step": t.get("step_seconds"), "s/eval": t.get("eval_seconds"),
             "stopped by": t["stopped_by"]} for t in trials]
    m0, m1 = result["machine_start"], result["machine_end"]
    steps = [t["steps"] for t in trials]
    md = [f"## {name}", "",
          f"Machine: {m0['cpu']}, {m0['cores']} cores, torch {m0['torch']}, {result['args']['threads']} thread, "
          f"fp32 (no native bf16); {m0['date']}; load average {m0['load_average_1min']} at the start, "
          f"{m1['load_average_1min']} at the end (the machine was shared with other runs: timings are not clean).", "",
          f"`{' '.join(result['command'].split())}` ({result['train_examples']} train / {result['dev_examples']} dev "
          f"examples), then `softprompt eval` on {result['test_examples']} test examples (bench/quality.py's seeded "
          "sample).", "",
          markdown_table(rows),
          f"Winner: trial {search['best_trial']} ({search['best']['method']}, lr {search['best']['lr']:.3g}), dev "
          f"{search['metric']} {search['best_value']:.4f}; {search['trials']} trials ({search['pruned']} pruned) in "
          f"{search['seconds']:.0f} s of a {search['budget']:.0f} s budget (stopped by {search['stopped_by']}). "
          f"**Test accuracy {test.get('accuracy'):.4f}, macro-F1 {test.get('macro_f1'):.4f}** (one seed, one run).", "",
          f"Each trial ran {min(steps)}-{max(steps)} steps of batch 8: far fewer than the 100 steps of the default "
          "recipe in quality_tweet_sentiment.md (0.569 accuracy on another machine, an Intel Xeon), so this says how "
          "the search spends a short budget on a loaded CPU, not how good its recipe is at convergence."]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
