"""How softprompt's training defaults were chosen: a short sweep of learning rate, init and loss on
bbc-news (and tweet-sentiment) through the real training path (``softprompt.train.train``), on the
default model.

Each run: STEPS steps x batch 8, texts cut to MAX_LENGTH tokens, dev accuracy / log loss on a
stratified dev sample, measured at a few steps along the way. Results accumulate in
``results/train_sweep.json`` keyed by run name, so the sweep can be split over invocations.

Run: .venv/bin/python bench/train_sweep.py --runs lr0.03,lr0.1 --seeds 0
     .venv/bin/python bench/train_sweep.py --task tweet-sentiment --runs lr0.03,lr0.1 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import sys

sys.path.insert(0, str(Path(__file__).parent))
from tasks import load_task, sample  # noqa: E402

from softprompt import load_base_model  # noqa: E402
from softprompt.examples import jsonl_bytes  # noqa: E402
from softprompt.train import TrainConfig, train  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RUNS: dict[str, dict] = {
    "lr0.01": {"lr": 0.01},
    "lr0.03": {"lr": 0.03},
    "lr0.1": {"lr": 0.1},
    "lr0.3": {"lr": 0.3},
    "vocab-lr0.1": {"lr": 0.1, "init": "vocab"},
    "vocab-lr0.03": {"lr": 0.03, "init": "vocab"},
    "text-lr0.1": {"lr": 0.1, "init": "text", "init_text": "Classify the topic of this news article:"},
    "tweet-text-lr0.1": {"lr": 0.1, "init": "text",
                         "init_text": "Classify the sentiment of this tweet as negative, neutral or positive:"},
    "ce+lm-lr0.1": {"lr": 0.1, "classify_loss": "ce+lm"},
    "nowarm-lr0.3": {"lr": 0.3, "warmup": 0.0},
    "ce+lm-lr0.03": {"lr": 0.03, "classify_loss": "ce+lm"},
    "fp32-lr0.1": {"lr": 0.1, "precision": "fp32"},
    "p10-lr0.1": {"lr": 0.1, "prompt_length": 10},
}
"""Run name -> TrainConfig fields that differ from the shared settings (init labels, ce, auto precision)."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bbc-news", choices=["bbc-news", "tweet-sentiment"])
    ap.add_argument("--runs", default="lr0.01,lr0.03,lr0.1,lr0.3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--dev-n", type=int, default=100)
    ap.add_argument("--eval-at", default="20,40,60")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default=None, help="results name (default: train_sweep, train_sweep_TASK)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_task(args.task, args.max_length)
    dev = sample(data, "dev", args.dev_n, seed=0)
    base = load_base_model(args.model)
    name = args.name or ("train_sweep" if args.task == "bbc-news" else f"train_sweep_{args.task.replace('-', '_')}")
    out_path = RESULTS / f"{name}.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"runs": {}}
    results["settings"] = {"steps": args.steps, "batch_size": 8, "max_length": args.max_length, "dev_n": len(dev),
                           "template": data.spec.template, "data": f"{args.task} (softprompt example-data, seed 0)"}
    eval_at = [int(x) for x in args.eval_at.split(",")]
    for name in args.runs.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "train.jsonl").write_bytes(jsonl_bytes(data.train, "classify"))
                (Path(d) / "dev.jsonl").write_bytes(jsonl_bytes(dev, "classify"))
                cfg = TrainConfig(data=f"{d}/train.jsonl", eval=f"{d}/dev.jsonl", out=f"{d}/p.safetensors",
                                  template=data.spec.template, labels=data.spec.labels, max_steps=args.steps, batch_size=8,
                                  max_length=args.max_length, seed=seed, eval_every=min(eval_at), patience=None,
                                  quiet=True, **RUNS[name])
                t0 = time.perf_counter()
                r = train(cfg, base=base)
                secs = time.perf_counter() - t0
            curve = {h["step"]: {k: round(v, 4) for k, v in h["eval"]["p"].items() if k in ("accuracy", "log_loss")}
                     for h in r.history if "eval" in h and h["step"] in eval_at}
            losses = [h["loss"] for h in r.history if "loss" in h]
            rec = {"run": name, "seed": seed, "fields": RUNS[name], "curve": curve,
                   "final_train_loss_10": round(sum(losses[-10:]) / 10, 4), "seconds": round(secs, 1),
                   "examples_per_s": round(r.examples_per_s, 3), "load": os.getloadavg()[0]}
            results["runs"][f"{name}/seed{seed}"] = rec
            RESULTS.mkdir(exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1))
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
