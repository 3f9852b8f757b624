"""Where a softprompt training step loses to PEFT's on a GPU: the step with the prompt's prefix
shared (one prompt pass per batch) vs packed in front of every row, with Linear weights cast by
autocast at every call vs held in bf16 for the run, next to PEFT prompt tuning; kernel launches and
GPU-busy time of one step from torch.profiler (SmolLM2-135M shape, bf16).

The measurements behind ``softprompt.train.speed.share_prompt_prefix`` and the cast on GPUs.
Random-weight Llama shapes from bench/gpu_check.py; labels of 4, 3, 5 and 12 tokens (the first
GPU check's label set, the in-process tokenizer's pieces). Needs a CUDA GPU.

Run: python bench/gpu_train_variants.py --out OUT_DIR      (~100 s on one H200)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)
LABELS = ["business", "sport", "politics", "science and technology"]
RUNS = (("smollm2-135m", ("bf16", "fp32")), ("llama-3.2-1b", ("bf16",)), ("llama-3.1-8b", ("bf16",)))


def profile_step(fn) -> dict:
    """Kernel launches and GPU-busy milliseconds of one step (after one unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    ka = p.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                     "cuLaunchKernelEx"))
    return {"kernel launches": launches, "GPU busy ms": round(sum(e.self_device_time_total for e in ka) / 1e3, 1)}


def run_shape(shape: str, precisions, clock, dev) -> list[dict]:
    from softprompt.train.speed import cast_linear_weights

    base = gc.build(shape, dev)
    tok = base.tokenizer
    label_ids = [tok(" " + l, add_special_tokens=False).input_ids for l in LABELS]
    src = [tok(t, add_special_tokens=False).input_ids[:128] for t in gc.texts(8, 128)]
    golds = [i % len(LABELS) for i in range(8)]
    rows = []
    for prec in precisions:
        amp = prec == "bf16"
        profiled = shape == "smollm2-135m" and amp

        def rec(side, fn, profile=False):
            r = clock(fn)
            rows.append({"model": shape, "precision": prec, "side": side, "seconds": round(r["s"], 5),
                         "peak GPU MB": r["peak_mb"], **(profile_step(fn) if profile else {})})
            print(rows[-1], flush=True)
        pt = gc.prompt_tuning(base.model)
        rec("PEFT prompt tuning", gc.peft_train_step(pt, gc.peft_batch(base, src, golds, label_ids), prec), profiled)
        base.model = pt.get_base_model()
        for cast in ((False, True) if amp else (False,)):
            with cast_linear_weights(base.model, torch.bfloat16 if cast else None):
                for deep, share in ((False, True), (False, False), (True, True)):
                    side = (f"softprompt {'deep' if deep else 'input'} prompt, prefix {'shared' if share else 'packed'}, "
                            f"weights {'held in bf16' if cast else 'cast per call'}")
                    rec(side, gc.ours_train_step(base, deep, src, golds, label_ids, prec, share=share),
                        profiled and not cast)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["model", "precision", "side", "seconds", "peak GPU MB", "kernel launches", "GPU busy ms"]
    lines = [f"# GPU training variants ({meta['device_name']}, {meta['date']})", "",
             "batch 8 x 128 tokens, 4 labels of 4/3/5/12 tokens, median of 5 steps after 1; "
             f"torch {meta['torch']}. Launches and GPU-busy time: one profiled step.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r.get(h, "")) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"device_name": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for shape, precisions in RUNS:
        rows += run_shape(shape, precisions, gc.Clock(dev, 1, 5), dev)
        torch.cuda.empty_cache()
        (out / "gpu_train_variants.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "gpu_train_variants.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
