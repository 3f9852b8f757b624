"""Peak host memory of training: softprompt vs PEFT prompt tuning at the same batch and length.

Each side runs in a fresh process (so one side's allocations cannot hide in the other's peak):
load the default model, train N steps on bbc-news (batch 8, sources cut to --max-length tokens,
20 virtual tokens), and report the process's peak resident memory as the OS counts it
(``ru_maxrss``), next to the resident memory after loading the model (weights + libraries).

- softprompt: ``softprompt.train.train`` (the command's path), at --precision (default fp32, the
  precision of CPUs without native bf16; ``auto`` runs bf16 where the CPU has it).
- PEFT: the plain PEFT loop of bench/peft_side.py (float32, full logits at every position).
- softprompt with ``--gradient-checkpointing``: the documented way to trade time for memory.

Run: .venv/bin/python bench/train_memory.py                  (default model, ~3 min on 2 cores)
     .venv/bin/python bench/train_memory.py --model DIR --steps 2 --name smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, write_results

SIDES = ("softprompt", "softprompt --gradient-checkpointing", "PEFT prompt tuning")


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_side(args) -> dict:
    """In the child process: load, train, report peaks as JSON on stdout."""
    import torch

    import peft_side
    from tasks import NAMES, load_task, sample

    from softprompt.examples import jsonl_bytes

    torch.set_num_threads(args.threads)
    data = load_task("bbc-news", args.max_length)
    examples = sample(data, "train", args.train_n, seed=0)
    t0 = time.perf_counter()
    if args.side.startswith("softprompt"):
        from softprompt import load_base_model
        from softprompt.train import TrainConfig, train

        base = load_base_model(args.model)
        loaded = _current_rss_mb()
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "train.jsonl"
            f.write_bytes(jsonl_bytes(examples, "classify"))
            r = train(TrainConfig(data=str(f), task="classify", template=data.spec.template, labels=data.spec.labels,
                                  out=str(Path(d) / "p.safetensors"), max_steps=args.steps, batch_size=args.batch_size,
                                  max_length=args.max_length, quiet=True, checkpoint_every=0, model=args.model,
                                  precision=args.precision,
                                  gradient_checkpointing="gradient-checkpointing" in args.side), base=base)
            from softprompt.artifact import load_prompt

            precision = load_prompt(r.path).meta.training["precision"]
    else:
        lm, tok, path = peft_side.load_hf(args.model)
        loaded = _current_rss_mb()
        model = peft_side.peft_prompt_tuning(lm, path, peft_side.init_text(data.spec, NAMES[data.name]), 20)
        peft_side.train_peft(model, tok, data.spec, examples, args.steps, args.batch_size)
        precision = "fp32"
    return {"side": args.side, "precision": precision, "RSS after load MB": loaded, "peak RSS MB": _rss_mb(),
            "training peak above load MB": round(_rss_mb() - loaded, 1), "wall s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160, help="source tokens (template included)")
    ap.add_argument("--train-n", type=int, default=64)
    ap.add_argument("--precision", default="fp32", help="softprompt's --precision (default fp32: the same as PEFT's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="train_memory")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    load0 = load_average()
    rows = []
    for side in SIDES:
        cmd = [sys.executable, __file__, "--side", side] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    sp, pf = rows[0]["training peak above load MB"], rows[2]["training peak above load MB"]
    summary = {"softprompt / PEFT, training peak above load": round(sp / pf, 3),
               "softprompt / PEFT, process peak": round(rows[0]["peak RSS MB"] / rows[2]["peak RSS MB"], 3),
               "load average start / end": f"{load0} / {load_average()}"}
    notes = (f"bbc-news, batch {args.batch_size}, sources cut to {args.max_length} tokens, 20 virtual tokens, "
             f"{args.steps} steps, {args.threads} torch thread(s); each side in a fresh process, peak RSS from the OS.")
    write_results(args.name, rows, summary, notes=notes)


if __name__ == "__main__":
    main()
