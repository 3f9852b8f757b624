"""What each of softprompt's training speed features buys: one training step (forward, backward,
AdamW) of PEFT prompt tuning and of softprompt with its features switched on one at a time.

Same weights, data (bbc-news train), batch 8, sources cut to 160 tokens, 20 virtual tokens, label
init. The machine these run on is shared, so the modes alternate within each round and the table
reports CPU seconds per step of this process (one thread by default: two OpenMP threads on a busy
2-core box mostly measure contention). End-to-end throughput through ``softprompt.train.train``
is ``train_speed.py``'s job.

Run: .venv/bin/python bench/train_ablation.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

import peft_side
from tasks import load_task, sample

from softprompt import PromptedModel, SoftPrompt, load_base_model
from softprompt.train.objective import Row, row_losses
from softprompt.train import attention_implementation, cast_linear_weights

RESULTS = Path(__file__).parent / "results"
MODES = {
    # name: (bf16 autocast, share prompt prefix, eager attention, bf16 linear weights held for the run)
    "softprompt fp32: rank-classification loss, lm head only at label positions": (False, False, False, False),
    "+ bf16 autocast (float32 master prompt)": (True, False, False, False),
    "+ each prompt run once per batch, keys/values shared by its rows": (True, True, False, False),
    "+ eager attention while training on CPU": (True, True, True, False),
    "+ bf16 Linear weights cast once per run instead of per call (default)": (True, True, True, True),
    "default features, fp32": (False, True, True, False),
    "default features, fp32, SDPA attention": (False, True, False, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default="train_ablation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_task("bbc-news", args.max_length)
    examples = sample(data, "train", 400, seed=0)
    spec, B = data.spec, args.batch_size
    base = load_base_model(args.model)
    tok = base.tokenizer
    pm = PromptedModel(base)
    label_ids = spec.label_ids(tok)
    prompt = SoftPrompt.initialize(base.embedding, tok, 20, "labels", labels=spec.words)
    opt = torch.optim.AdamW([prompt.weight], lr=3e-2)
    lm, ptok, path = peft_side.load_hf(args.model)
    peft_model = peft_side.peft_prompt_tuning(lm, path, peft_side.init_text(spec, "topic"), 20)
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)

    def step(i: int, mode: str) -> float:
        batch = examples[(i % 40) * B : (i % 40 + 1) * B]
        c0 = time.process_time()
        if mode == "PEFT prompt tuning (full logits, fp32, SDPA)":
            enc = peft_side.collate(ptok, [peft_side.encode(spec, ptok, e) for e in batch])
            peft_model.train()
            peft_model(**enc).loss.backward()
            peft_opt.step()
            peft_opt.zero_grad()
            return time.process_time() - c0
        amp, share, eager, cast = MODES[mode]
        rows = [Row(0, spec.source_ids(tok, e.source), spec.labels.index(e.target)) for e in batch]
        dt = torch.bfloat16 if amp else None
        with attention_implementation(base.model, "eager" if eager else None), \
                cast_linear_weights(base.model, dt if cast else None), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = row_losses(pm, [prompt.weight], rows, [label_ids], share_prefix=share).sum() / B
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.process_time() - c0

    names = ["PEFT prompt tuning (full logits, fp32, SDPA)", *MODES]
    times: dict[str, list[float]] = {m: [] for m in names}
    for m in names:
        step(0, m)  # warm-up
    for r in range(args.rounds):
        for m in names:
            times[m].append(step(r + 1, m))
            print(f"round {r + 1} {m}: {times[m][-1]:.2f} CPU s", flush=True)
    peft = statistics.median(times[names[0]])
    rows_out = [{"step": m, "cpu_s_per_step": round(statistics.median(v), 3), "min": round(min(v), 3),
                 "examples_per_cpu_s": round(B / statistics.median(v), 3),
                 "vs_peft": round(peft / statistics.median(v), 2)} for m, v in times.items()]
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows_out, "settings": vars(args), "load_average_end": os.getloadavg()[0]}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = ["| training step | CPU s/step (median) | examples per CPU s | vs PEFT |", "|---|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['cpu_s_per_step']:.2f} | {r['examples_per_cpu_s']:.2f} | {r['vs_peft']:.2f}x |"
              for r in rows_out]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
