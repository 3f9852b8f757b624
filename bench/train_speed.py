"""Training throughput: softprompt's real training path vs PEFT prompt tuning, side by side.

Same base weights, data (bbc-news train split), batch size (8), sources cut to 160 tokens, 20
virtual tokens and number of steps; the two alternate (softprompt, PEFT, softprompt, PEFT, ...)
so machine noise hits both. Each side's first step of a run is warm-up and not timed.

- softprompt: ``softprompt.train.train`` with its defaults (no dev set, so nothing but training
  is timed); examples/s from its own per-step records (metrics.jsonl).
- PEFT: ``get_peft_model(model, PromptTuningConfig(CAUSAL_LM, 20 virtual tokens, TEXT init))``,
  a plain loop calling the model with ``labels`` (full logits, loss on the label tokens), batches
  padded by the tokenizer, AdamW lr 3e-2 (bench/peft_side.py); its forward under bf16 autocast where
  the CPU has native bf16 (``--peft-precision auto``, every side in its fastest precision, issue #26),
  ``--peft-precision fp32`` as PEFT's guides run it.

Run: .venv/bin/python bench/train_speed.py                 (default model, ~10 min on 2 cores)
     .venv/bin/python bench/train_speed.py --model DIR --steps 3 --rounds 1 --name smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import add_peft_precision, load_average, set_threads, write_results

import peft_side
from tasks import NAMES, load_task, sample

from softprompt import load_base_model
from softprompt.examples import jsonl_bytes
from softprompt.train import TrainConfig, train


def softprompt_run(data, train_file: Path, work: Path, args, base, seed: int) -> dict:
    """One softprompt training run; throughput from its per-step records (first step skipped)."""
    cfg = TrainConfig(data=str(train_file), task="classify", template=data.spec.template, labels=data.spec.labels,
                      out=str(work / f"sp{seed}.safetensors"), max_steps=args.steps, batch_size=args.batch_size,
                      prompt_length=args.prompt_length, max_length=args.max_length, seed=seed, quiet=True,
                      checkpoint_every=0, model=args.model, precision=args.precision)
    result = train(cfg, base=base)
    steps = [r for r in result.history if "examples_per_s" in r][1:]  # step 1 is warm-up
    seconds = sum(args.batch_size / r["examples_per_s"] for r in steps)
    return {"examples/s": len(steps) * args.batch_size / seconds, "s/step": seconds / len(steps),
            "precision": _precision(result.path), "final loss": steps[-1]["loss"]}


def _precision(path: Path) -> str:
    from softprompt.artifact import load_prompt

    return load_prompt(path).meta.training.get("precision", "?")


def peft_run(data, examples, args, seed: int) -> dict:
    """One PEFT prompt-tuning run (fresh model each time; first step skipped)."""
    lm, tok, path = peft_side.load_hf(args.model)
    model = peft_side.peft_prompt_tuning(lm, path, peft_side.init_text(data.spec, NAMES[data.name]), args.prompt_length)
    run = peft_side.train_peft(model, tok, data.spec, examples, args.steps, args.batch_size,
                               lr=peft_side.LEARNING_RATES["prompt-tuning"], seed=seed, precision=args.peft_precision)
    timed = run.step_seconds[1:]
    return {"examples/s": run.examples_per_second(args.batch_size), "s/step": sum(timed) / len(timed),
            "precision": run.precision, "final loss": run.losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (softprompt run, PEFT run)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=160, help="source tokens (template included)")
    ap.add_argument("--train-n", type=int, default=400, help="training examples sampled from the train split")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    ap.add_argument("--precision", default="auto", help="softprompt's --precision (auto: bf16 where the CPU has it natively; "
                    "fp32 shows what CPUs without native bf16 get)")
    add_peft_precision(ap)
    ap.add_argument("--name", default="train_speed", help="results name")
    args = ap.parse_args()
    if args.steps < 2 or args.rounds < 1:
        raise SystemExit("--steps must be at least 2 (the first is warm-up) and --rounds at least 1")
    set_threads(args.threads)

    load0 = load_average()
    data = load_task("bbc-news", args.max_length)
    examples = sample(data, "train", args.train_n, seed=0)
    base = load_base_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        train_file = work / "train.jsonl"
        train_file.write_bytes(jsonl_bytes(examples, "classify"))
        for r in range(args.rounds):
            for side in ("softprompt", "PEFT prompt tuning"):
                t0 = time.perf_counter()
                res = (softprompt_run(data, train_file, work, args, base, r) if side == "softprompt"
                       else peft_run(data, examples, args, r))
                rows.append({"round": r + 1, "side": side, **res, "wall s": round(time.perf_counter() - t0, 1),
                             "load": load_average()})
                print(f"round {r + 1} {side}: {res['examples/s']:.2f} examples/s "
                      f"({res['s/step']:.2f} s/step, {res['precision']})", flush=True)

    pf_precision = next(x["precision"] for x in rows if x["side"] != "softprompt")
    sp = [x["examples/s"] for x in rows if x["side"] == "softprompt"]
    pf = [x["examples/s"] for x in rows if x["side"] != "softprompt"]
    ratios = [a / b for a, b in zip(sp, pf)]
    summary = {
        "softprompt examples/s (median)": statistics.median(sp),
        "PEFT examples/s (median)": statistics.median(pf),
        "speed-up (median of per-round ratios)": statistics.median(ratios),
        "speed-up min / max": f"{min(ratios):.2f} / {max(ratios):.2f}",
        "target": ">= 2.5 with native bf16, >= 2.0 without",
        "met": statistics.median(ratios) >= (2.0 if rows[0]["precision"] == "fp32" else 2.5),
        "load average start / end": f"{load0} / {load_average()}",
    }
    notes = (f"bbc-news, {len(examples)} training examples, batch {args.batch_size}, sources cut to {args.max_length} "
             f"tokens, {args.prompt_length} virtual tokens, {args.steps} steps per run (first not timed), "
             f"{args.rounds} alternating rounds. softprompt: `softprompt.train.train` defaults (precision auto: bf16 "
             "autocast where the CPU has native bf16, rank-classification loss through the cached source, lm head "
             "only at label positions, length-bucketed batches). PEFT: prompt tuning, TEXT init, full logits at every "
             "position, tokenizer padding, "
             f"{'float32' if pf_precision == 'fp32' else pf_precision + ' autocast'} (--peft-precision {args.peft_precision}).")
    write_results(args.name, rows, summary, notes=notes)


if __name__ == "__main__":
    main()
