"""How the deep-prompt defaults were chosen (README › Deep prompts): ``train_sweep.py``'s runs
plus ``--method prefix`` / ``--reparam`` runs, through the real training path on the default model;
and ``--speed``: seconds per training step of each method (no evaluation, a few steps).

Run: .venv/bin/python bench/deep_sweep.py --task tweet-sentiment --runs prefix-lr0.03,prefix-lr0.1 \
         --steps 60 --max-length 64 --name train_sweep_deep --threads 1
     .venv/bin/python bench/deep_sweep.py --speed --steps 4 --threads 1
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_sweep  # noqa: E402

train_sweep.RUNS.update({
    "prompt-lr0.1": {"lr": 0.1},
    "residual-lr0.1": {"lr": 0.1, "reparam": "residual"},
    "residual-lr0.03": {"lr": 0.03, "reparam": "residual"},
    "residual-gain0-lr0.1": {"lr": 0.1, "reparam": "residual"},  # LayerNorm gain initialised to 0 (trainable.py)
    **{f"prefix-lr{lr}": {"lr": lr, "method": "prefix"} for lr in (0.003, 0.01, 0.03, 0.1, 0.3)},
    **{f"prefix-vocab-lr{lr}": {"lr": lr, "method": "prefix", "init": "vocab"} for lr in (0.01, 0.03, 0.1)},
    **{f"prefix-mlp-lr{lr}": {"lr": lr, "method": "prefix", "reparam": "mlp"} for lr in (1e-4, 3e-4, 1e-3, 3e-3)},
})

SPEED_RUNS = {
    "--method prompt": {},
    "--method prefix": {"method": "prefix"},
    "--method prefix --reparam mlp": {"method": "prefix", "reparam": "mlp", "lr": 1e-3},
    "--reparam residual": {"reparam": "residual"},
}


def cpu_name() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name")), platform.processor())
    return name + "".join(f", {f}" for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags)


def speed(steps: int, max_length: int, rounds: int) -> None:
    """Median seconds per step (steps after the first) of each method, rounds interleaved: wall
    seconds, and CPU seconds of the training thread (one thread; robust to other jobs on the cores)."""
    import time

    from softprompt import load_base_model
    from softprompt.examples import jsonl_bytes
    from softprompt.train import TrainConfig, loop, train
    from tasks import load_task

    real, cpu_s = loop._train_step, []

    def timed(run, state, step):  # CPU time of one optimizer step
        t = time.thread_time()
        rec = real(run, state, step)
        cpu_s.append(time.thread_time() - t)
        return rec

    loop._train_step = timed

    data = load_task("bbc-news", max_length)
    base = load_base_model(None)
    times: dict[str, list[float]] = {k: [] for k in SPEED_RUNS}
    cpu: dict[str, list[float]] = {k: [] for k in SPEED_RUNS}
    for _ in range(rounds):
        for name, fields in SPEED_RUNS.items():
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "train.jsonl").write_bytes(jsonl_bytes(data.train[:64], "classify"))
                r = train(TrainConfig(data=f"{d}/train.jsonl", out=f"{d}/p.safetensors", template=data.spec.template,
                                      labels=data.spec.labels, max_steps=steps, batch_size=8, max_length=max_length,
                                      checkpoint_every=0, quiet=True, **fields), base=base)
            times[name] += [8 / h["examples_per_s"] for h in r.history if "loss" in h][1:]
            cpu[name] += cpu_s[1:]
            cpu_s.clear()
    out = {"cpu": cpu_name(), "threads": train_sweep.torch.get_num_threads(), "max_length": max_length,
           "batch_size": 8, "prompt_length": 20, "load": os.getloadavg()[0],
           "s_per_step": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "cpu_s_per_step": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
           "samples": {k: len(v) for k, v in cpu.items()}}
    (train_sweep.RESULTS / "deep_speed.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if "--speed" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("--speed", action="store_true")
        ap.add_argument("--steps", type=int, default=4)
        ap.add_argument("--rounds", type=int, default=1)
        ap.add_argument("--max-length", type=int, default=160)
        ap.add_argument("--threads", type=int, default=1)
        a = ap.parse_args()
        train_sweep.torch.set_num_threads(a.threads)
        speed(a.steps, a.max_length, a.rounds)
    else:
        train_sweep.main()
