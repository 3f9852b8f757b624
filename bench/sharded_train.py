"""Training with the frozen base sharded over processes: data parallel vs the FSDP config vs the
DeepSpeed ZeRO-3 config, side by side.

Each run is ``accelerate launch --config_file configs/accelerate/CONFIG -m softprompt train`` with
two processes (gloo on a CPU machine, NCCL on GPUs) on the same data (bbc-news train sample),
batch, steps and seed; the three configs alternate per round so machine noise hits all of them.
Per step: the seconds from the run's own records (metrics.jsonl; the first two steps are warm-up
and not timed). Per process: the base's parameter bytes held between layer calls, as the prompt
file records them (``training.sharded_base``; the replicated base in data parallel).

Run: .venv/bin/python bench/sharded_train.py                  (default model, ~10 min on 2 cores)
     .venv/bin/python bench/sharded_train.py --model DIR --steps 4 --rounds 1 --name smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, write_results

from tasks import load_task, sample

from softprompt.artifact import load_prompt
from softprompt.distributed.launch import free_port
from softprompt.examples import jsonl_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"data parallel": "data-parallel.yaml", "FSDP": "fsdp.yaml",
           "FSDP, every process loads": "fsdp.yaml:fsdp_cpu_ram_efficient_loading: false",
           "DeepSpeed ZeRO-3": "deepspeed-zero3.yaml",
           "ZeRO-3, every process loads": "deepspeed-zero3.yaml:zero3_init_flag: false"}
"""Row name -> accelerate config in configs/accelerate (``FILE:SETTING: VALUE`` overrides one line)."""


def config_file(spec: str, work: Path) -> Path:
    """The config file a :data:`CONFIGS` entry names (an override is written to ``work``)."""
    name, _, override = spec.partition(":")
    path = ROOT / "configs" / "accelerate" / name
    if not override:
        return path
    key = override.split(":")[0].strip()
    lines = [f"  {override.strip()}" if line.strip().startswith(key + ":") else line
             for line in path.read_text().splitlines()]
    out = work / f"{key}-{name}"
    out.write_text("\n".join(lines) + "\n")
    return out


def run(config: Path, train_file: Path, data, out: Path, args) -> dict:
    """One two-process training run; its per-step seconds, the base bytes each process held and
    each process's peak host memory."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "softprompt", "train",
           "--data", str(train_file), "--task", "classify", "--template", data.spec.template,
           "--labels", ",".join(data.spec.labels), "--out", str(out), "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--prompt-length", str(args.prompt_length),
           "--max-length", str(args.max_length), "--checkpoint-every", "0", "--precision", args.precision, "--quiet"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{config} failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out.parent / f"{out.stem}.run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "examples_per_s" in x][2:]  # the first two steps are warm-up
    seconds = [args.batch_size / x["examples_per_s"] for x in steps]
    training = load_prompt(out).meta.training
    info = training.get("sharded_base", {})
    held, rss = info.get("bytes_per_process"), info.get("peak_host_rss_mb_per_process")
    return {"s/step": statistics.median(seconds), "MB per process": round(max(held) / 1e6, 1) if held else None,
            "peak RSS MB (proc 0 / 1)": " / ".join(f"{x:.0f}" for x in rss) if rss else None,
            "final loss": steps[-1]["loss"], "wall s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first two are warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (one run of each config)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=64, help="source tokens (template included)")
    ap.add_argument("--train-n", type=int, default=200, help="training examples sampled from the train split")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--name", default="sharded_train", help="results name")
    args = ap.parse_args()
    if args.steps < 3 or args.rounds < 1:
        raise SystemExit("--steps must be at least 3 (the first two are warm-up) and --rounds at least 1")

    load0 = load_average()
    data = load_task("bbc-news", args.max_length)
    examples = sample(data, "train", args.train_n, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        train_file = work / "train.jsonl"
        train_file.write_bytes(jsonl_bytes(examples, "classify"))
        full = None
        for r in range(args.rounds):
            for i, (name, spec) in enumerate(CONFIGS.items()):
                res = run(config_file(spec, work), train_file, data, work / f"{r}-{i}.safetensors", args)
                if name == "data parallel":
                    from softprompt import load_base_model

                    if full is None:  # the replicated base: every parameter on every process
                        lm = load_base_model(args.model).model
                        full = round(sum(p.numel() * p.element_size() for p in lm.parameters()) / 1e6, 1)
                    res["MB per process"] = full
                rows.append({"round": r + 1, "config": name, **res, "load": load_average()})
                print(f"round {r + 1} {name}: {res['s/step']:.3f} s/step, {res['MB per process']} MB per process",
                      flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in rows if x["config"] == name)

    dp = med("data parallel", "s/step")
    summary = {f"{name} s/step (median)": med(name, "s/step") for name in CONFIGS}
    summary.update({f"{name} / data parallel": med(name, "s/step") / dp for name in CONFIGS if name != "data parallel"})
    summary.update({f"{name} MB per process": med(name, "MB per process") for name in CONFIGS})
    summary["load average start / end"] = f"{load0} / {load_average()}"
    notes = (f"bbc-news, {len(examples)} training examples, 2 processes x {args.threads} torch thread(s), batch "
             f"{args.batch_size} (global), sources cut to {args.max_length} tokens, {args.prompt_length} virtual tokens, "
             f"{args.steps} steps per run (first two not timed), precision {args.precision}, {args.rounds} alternating "
             "rounds. MB per process: base parameter bytes held between layer calls (the prompt file's "
             "training.sharded_base; data parallel: the whole base). Peak RSS: each process's peak resident host "
             "memory (sharded runs only). FSDP / DeepSpeed ZeRO-3: configs/accelerate/fsdp.yaml / deepspeed-zero3.yaml "
             "(cpu_ram_efficient_loading / zero3_init_flag: process 0 reads the checkpoint and sends the others their "
             "parts); 'every process loads': the same config with that setting off.")
    write_results(args.name, rows, summary, notes=notes)


if __name__ == "__main__":
    main()
