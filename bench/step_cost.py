"""Seconds per training step of each method, side by side in one run, alternating rounds: what
turns learning_curves.py's step counts into an equal-wall-clock comparison that does not depend
on how loaded the machine was while each long curve ran.

Same data, batch, text length, precision (auto on both sides: bf16 autocast where the CPU has
native bf16, fp32 elsewhere; --peft-precision fp32 for PEFT as its guides run it) and one
thread for every method; the first steps of each run (warm-up) are left out; the median step.

Run:
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_cost.py --task tweet-sentiment
Writes results/step_cost_TASK.json/.md.
"""

from __future__ import annotations

import argparse
import statistics

from common import add_peft_precision, set_threads, write_results

import peft_side
from learning_curves import run_softprompt, step_seconds
from tasks import TASKS, load_task

from softprompt import load_base_model

WARMUP = 2
"""Steps of each run left out."""


def softprompt_steps(data, args, method: str, base) -> list[float]:
    return list(step_seconds(run_softprompt(data, args, method, base), args.batch_size).values())


def lora_steps(data, args) -> list[float]:
    lm, tok, _ = peft_side.load_hf(args.model)  # a fresh model each run (LoRA wraps it)
    run = peft_side.train_peft(peft_side.peft_lora(lm), tok, data.spec, data.train, args.steps, args.batch_size,
                               lr=peft_side.LEARNING_RATES["lora"], seed=0, precision=args.peft_precision)
    return list(run.step_seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweet-sentiment", choices=TASKS)
    ap.add_argument("--methods", default="lora,prompt,prefix-lr01,prefix-scaled")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    add_peft_precision(ap)
    ap.add_argument("--name", default=None, help="results name (default step_cost_TASK)")
    args = ap.parse_args()
    set_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    data = load_task(args.task, args.max_length)
    base = load_base_model(args.model)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            steps = lora_steps(data, args) if m == "lora" else softprompt_steps(data, args, m, base)
            times[m] += steps[WARMUP:]
            print(m, round(statistics.median(steps[WARMUP:]), 3), flush=True)
    ref = statistics.median(times["lora"]) if "lora" in times else None
    rows = [{"method": m, "steps": len(t), "median_s_per_step": round(statistics.median(t), 3),
             "vs_lora": round(statistics.median(t) / ref, 3) if ref else None} for m, t in times.items()]
    write_results(args.name or f"step_cost_{args.task.replace('-', '_')}", rows,
                  notes=f"Task {args.task}, batch {args.batch_size}, texts cut to {args.max_length} tokens, "
                        f"{args.steps} steps a run ({WARMUP} left out), {args.rounds} alternating rounds; softprompt "
                        f"--precision auto, LoRA --peft-precision {args.peft_precision}.")


if __name__ == "__main__":
    main()
