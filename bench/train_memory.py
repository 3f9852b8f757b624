"""Peak host memory of training by label-set shape: softprompt (input and deep prompt) vs PEFT
prompt tuning and LoRA at the same batch and length.

Each side runs in a fresh process (so one side's allocations cannot hide in the other's peak):
load the default model, train N steps on bbc-news texts whose labels are renamed to a label set
of the chosen shape (3, 8 or 50 labels of 1 token, or of 1-4 words), and report the process's peak
resident memory as the OS counts it (``ru_maxrss``) next to the resident memory after loading the
model (weights + libraries), and the mean step time.

- softprompt: ``softprompt.train.train`` (the command's path; rank classification scores every
  label, so its memory could grow with the label set), input prompt (``prompt``) and deep prompt
  (``prefix``), at --precision (default fp32: PEFT's).
- PEFT prompt tuning and LoRA r=8: the plain PEFT loop of bench/peft_side.py (language-model loss
  on the gold label only, so its memory does not depend on the label set).
- ``--baseline-src DIR``: also run softprompt's sides with another checkout's ``src`` (e.g. a
  worktree of an older commit), side by side in the same invocation.

Run: .venv/bin/python bench/train_memory.py                      (default model, ~10 min on 2 cores)
     .venv/bin/python bench/train_memory.py --model DIR --steps 2 --shapes 3x1 --name smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, write_results

WORDS = ("business finance economy sport match team politics election government technology phone software "
         "health hospital doctor music film award travel flight hotel weather storm rain science space "
         "research education school exam crime court police energy oil climate food recipe farm fashion "
         "design art history war peace market bank loan insurance housing rent transport railway").split()
SHAPES = ("3x1", "3x4", "8x1", "8x4", "50x4")
"""Label sets: ``CxW`` = C labels of 1 word (W=1) or of 1..W words, cycling (W=4)."""
SIDES = ("softprompt prompt", "softprompt prefix", "PEFT prompt tuning", "PEFT LoRA r=8")


def label_set(shape: str) -> list[str]:
    """The label names of a shape (pure): distinct, deterministic, 1 or 1..W words each."""
    c, w = (int(x) for x in shape.split("x"))
    names = []
    for i in range(c):
        k = 1 if w == 1 else 1 + i % w
        names.append(" ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(k)))
    assert len(set(names)) == c, names
    return names


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
    from tasks import load_task, sample

    from softprompt.data import Example, TaskSpec
    from softprompt.examples import jsonl_bytes

    torch.set_num_threads(args.threads)
    data = load_task("bbc-news", args.max_length)
    names = label_set(args.shape)
    examples = [Example(e.source, names[i % len(names)]) for i, e in enumerate(sample(data, "train", args.train_n, seed=0))]
    spec = TaskSpec("classify", data.spec.template, labels=names, max_length=args.max_length)
    t0 = time.perf_counter()
    if args.side.startswith("softprompt"):
        from softprompt import load_base_model
        from softprompt.train import TrainConfig, train

        base = load_base_model(args.model)
        loaded = _current_rss_mb()
        label_tokens = [len(l) for l in spec.label_ids(base.tokenizer)]
        from dataclasses import fields

        fixed = {"memory_budget": "none"} if "memory_budget" in {f.name for f in fields(TrainConfig)} else {}
        with tempfile.TemporaryDirectory() as d:  # memory_budget none: measure the plain step, never switch
            f = Path(d) / "train.jsonl"
            f.write_bytes(jsonl_bytes(examples, "classify"))
            r = train(TrainConfig(data=str(f), task="classify", template=spec.template, labels=names,
                                  out=str(Path(d) / "p.safetensors"), max_steps=args.steps, batch_size=args.batch_size,
                                  max_length=args.max_length, quiet=True, checkpoint_every=0, model=args.model,
                                  precision=args.precision, method=args.side.split()[1], **fixed), base=base)
            step_s = [args.batch_size / h["examples_per_s"] for h in r.history if "examples_per_s" in h]
    else:
        lm, tok, path = peft_side.load_hf(args.model)
        loaded = _current_rss_mb()
        label_tokens = [len(tok(" " + n, add_special_tokens=False).input_ids) for n in names]
        model = (peft_side.peft_prompt_tuning(lm, path, peft_side.init_text(spec, "news"), 20)
                 if "prompt tuning" in args.side else peft_side.peft_lora(lm, 8))
        step_s = peft_side.train_peft(model, tok, spec, examples, args.steps, args.batch_size).step_seconds
    later = step_s[1:] or step_s  # the first step pays one-time costs
    import softprompt

    return {"side": args.side + (f" ({args.src_name})" if args.src_name else ""), "labels": args.shape,
            "softprompt from": str(Path(softprompt.__file__).parents[2]),
            "label tokens": f"{min(label_tokens)}-{max(label_tokens)}", "RSS after load MB": loaded,
            "peak RSS MB": _rss_mb(), "training peak above load MB": round(_rss_mb() - loaded, 1),
            "step s": round(sum(later) / len(later), 3), "wall s": round(time.perf_counter() - t0, 1)}


def _child(side: str, shape: str, argv: list[str], src: str | None, src_name: str) -> dict:
    env = dict(os.environ)
    if src:  # bench/common.py puts this checkout's src first unless told otherwise
        env["SOFTPROMPT_SRC"] = str(Path(src).resolve() / "src")
    cmd = [sys.executable, __file__, "--side", side, "--shape", shape, "--src-name", src_name, *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode and "MemoryError" in r.stderr or r.returncode in (-9, 137):
        return {"side": side + (f" ({src_name})" if src_name else ""), "labels": shape, "peak RSS MB": "out of memory"}
    if r.returncode:
        raise SystemExit(f"{side} {shape} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160, help="source tokens (template included)")
    ap.add_argument("--train-n", type=int, default=64)
    ap.add_argument("--precision", default="fp32", help="softprompt's --precision (default fp32: the same as PEFT's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="label sets CxW, comma-separated")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated")
    ap.add_argument("--baseline-src", default=None, help="another checkout: its softprompt runs the softprompt sides too")
    ap.add_argument("--name", default="train_memory")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src-name", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    passed = [a for a in sys.argv[1:]]
    if args.baseline_src:  # the children take the other fields; --baseline-src is not theirs
        i = passed.index("--baseline-src")
        passed = passed[:i] + passed[i + 2:]
    load0 = load_average()
    rows = []
    for shape in args.shapes.split(","):
        for side in args.sides.split(","):
            rows.append(_child(side, shape, passed, None, ""))
            print(rows[-1], flush=True)
            if args.baseline_src and side.startswith("softprompt"):
                rows.append(_child(side, shape, passed, args.baseline_src, "baseline"))
                print(rows[-1], flush=True)
            _write(args, rows, load0)  # after every row: a run cut short keeps what it measured


def _write(args, rows: list[dict], load0: float) -> None:
    summary = {"load average start / end": f"{load0} / {load_average()}"}
    peak = {(r["side"], r["labels"]): r["peak RSS MB"] for r in rows if isinstance(r["peak RSS MB"], float)}
    for shape in args.shapes.split(","):
        for side in ("softprompt prompt", "softprompt prefix"):
            if (side, shape) in peak and ("PEFT prompt tuning", shape) in peak:
                summary[f"{side} / PEFT prompt tuning, peak RSS, {shape}"] = round(
                    peak[side, shape] / peak["PEFT prompt tuning", shape], 3)
    for shape in args.shapes.split(","):
        for side in ("softprompt prompt", "softprompt prefix"):
            if (side, shape) in peak and (f"{side} (baseline)", shape) in peak:
                summary[f"{side} / its baseline, peak RSS, {shape}"] = round(peak[side, shape] / peak[f"{side} (baseline)", shape], 3)
    for c in ("3", "8"):
        if ("softprompt prompt", f"{c}x4") in peak and ("softprompt prompt", f"{c}x1") in peak:
            summary[f"softprompt prompt, {c} labels, long / one-word labels, peak RSS"] = round(
                peak["softprompt prompt", f"{c}x4"] / peak["softprompt prompt", f"{c}x1"], 3)
    notes = (f"bbc-news texts relabelled to each label set (CxW: C labels of 1 word, or 1..W words), batch "
             f"{args.batch_size}, sources cut to {args.max_length} tokens, 20 virtual tokens, {args.steps} steps "
             f"(step s: mean over steps 2+), {args.threads} torch thread(s), softprompt --precision {args.precision}; "
             "each side in a fresh process, peak RSS from the OS."
             + (f" '(baseline)': softprompt from {args.baseline_src}." if args.baseline_src else ""))
    write_results(args.name, rows, summary, notes=notes)


if __name__ == "__main__":
    main()
