"""Many prompts on one server (#24): start-up time and server RSS with thousands of prompt files
in ``--prompts``, then latency, throughput and prefix-cache behaviour under a request stream over
more distinct prompts than the cache holds, next to a one-prompt stream in the same invocation.

Prompt files are copies of one prompt (20 virtual tokens, 5 topic labels, float16 on disk) plus
noise, written to a temp folder: ``--flat`` of them flat (the issue's measurement on main 45c564b:
3,000 files, ``--dtype float32``: start-up 288 s, RSS 4,452 MB before traffic) and ``--nested``
of them in 100 namespace folders. Each server is its own process (``softprompt serve --dtype
float32 --threads 1``); start-up is spawn -> first 200 from /healthz (polled every 0.1 s), next
to a server on an empty folder (the model load). RSS is the server's VmRSS (VmHWM: peak).

Traffic: ``--requests`` classifications of short texts, ``--concurrency`` in flight, first all on
one prompt (the hit path), then drawn Zipf(1.1) over ``--distinct`` prompts of the nested folder
with ``--prefix-cache-mb`` far below what they would take; hit rate, evictions, prefills and
prefill seconds come from the server's /metrics. ``--baseline-src DIR`` also starts another
checkout's server on the flat folder (its start-up and RSS), e.g. a main before the store.
The traffic matrix (1 / 100 / 1,000 prompts, input and deep, a generation mix, the vLLM backend)
is bench/many_prompts_matrix.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/many_prompts.py              (~5 min on 2 cores)
     OMP_NUM_THREADS=1 .venv/bin/python bench/many_prompts.py --flat 300 --nested 1000 --requests 60  (smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

from serve import Server, drive, free_port
from softprompt import PromptMeta, SoftPrompt, load_base_model
from softprompt.artifact import prompt_bytes

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
TEXTS = ["shares fell as the market reacted to the rate decision", "the home team won the match in extra time",
         "a new phone with a faster chip was announced", "the minister said the election will be held in spring",
         "the film won three awards at the festival", "the central bank kept interest rates unchanged"]
OLD = {"files": 3000, "startup_s": 288.0, "rss_mb": 4452.0}
"""The issue's measurement on main 45c564b (AMD EPYC, fp32, 3,000 flat files, before any traffic)."""


def write_prompts(base, folder: Path, n: int, namespaces: int, length: int, seed: int) -> list[str]:
    """``n`` noisy copies of one prompt; names ``p00000`` (flat) or ``nsNN/p00000`` (nested)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = SoftPrompt.initialize(base.embedding, base.tokenizer, length, "labels", labels=TOPICS, seed=seed).weight
    meta = PromptMeta.for_base(base, length, task="classify", labels=TOPICS, template="Text: {text}\nTopic:")
    names = []
    for i in range(n):
        name = f"ns{i % namespaces:02d}/p{i:05d}" if namespaces else f"p{i:05d}"
        path = folder / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(prompt_bytes(w + 0.01 * torch.randn(w.shape, generator=g), meta))  # float16 on disk
        names.append(name)
    return names


def rss_mb(pid: int) -> dict[str, float]:
    """Current and peak resident set of a process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": round(out["VmRSS"], 1), "peak_rss_mb": round(out["VmHWM"], 1)}


def start(folder: Path, src: Path, extra: list[str], log: Path) -> tuple[Server, float]:
    """A server on ``folder`` with ``src``'s softprompt; returns it and its start-up seconds."""
    port = free_port()
    os.environ["PYTHONPATH"] = str(src)
    cmd = [sys.executable, "-m", "softprompt", "serve", "--prompts", str(folder), "--port", str(port),
           "--dtype", "float32", "--threads", "1", "--max-batch", "16", "--request-timeout", "120", *extra]
    t0 = time.perf_counter()
    srv = Server(cmd, port, log, ready_timeout=900, poll=0.1)
    return srv, time.perf_counter() - t0


def scrape(url: str) -> dict[str, float]:
    """The store's numbers from /metrics (prometheus text)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for key in ("prompts_resident", "prefix_cache_bytes", "prefix_cache_limit_bytes", "prefix_cache_hits_total",
                "prefix_cache_misses_total", "prefix_cache_evictions_total", "prefix_prefills_total",
                "prefix_prefill_seconds_total", "prompt_load_seconds_total", "prefix_spill_hits_total",
                "prefix_spill_writes_total", "prefix_spill_read_seconds_total", "prefix_spill_bytes"):
        m = re.search(rf"^softprompt_{key} (\S+)$", text, re.M)
        out[key] = float(m.group(1)) if m else None
    return out


def traffic(srv: Server, names: list[str], args, rng: random.Random) -> dict:
    """Drive ``--requests`` classifications over ``names`` (Zipf(1.1) by rank) and report."""
    weights = [1 / (r + 1) ** 1.1 for r in range(len(names))]
    picks = rng.choices(names, weights, k=args.requests)
    reqs = [("/v1/classify", {"prompt": p, "text": rng.choice(TEXTS)}) for p in picks]
    before = scrape(srv.url)
    res = asyncio.run(drive(srv.url, reqs, args.concurrency, 300))
    after = scrape(srv.url)
    d = {k: (after[k] or 0) - (before[k] or 0) for k in after if k.endswith("_total")}
    looked = d["prefix_cache_hits_total"] + d["prefix_cache_misses_total"]
    prefills = d["prefix_prefills_total"]
    return {"requests/s": round(res["rps"], 2), "p50 ms": round(res["p50"] * 1000, 1), "p99 ms": round(res["p99"] * 1000, 1),
            "distinct": len(set(picks)), "hit rate": round(d["prefix_cache_hits_total"] / looked, 3) if looked else None,
            "evictions": int(d["prefix_cache_evictions_total"]), "prefills": int(prefills),
            "prefill ms each": round(1000 * d["prefix_prefill_seconds_total"] / prefills, 1) if prefills else None,
            "resident": int(after["prompts_resident"]), "cache MB": round(after["prefix_cache_bytes"] / 2**20, 1),
            "limit MB": round(after["prefix_cache_limit_bytes"] / 2**20, 1), **rss_mb(srv.proc.pid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--flat", type=int, default=3000, help="prompt files in the flat folder")
    ap.add_argument("--nested", type=int, default=10000, help="prompt files in the nested folder (100 namespaces)")
    ap.add_argument("--distinct", type=int, default=1000, help="prompts the Zipf stream draws from")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefix-cache-mb", type=float, default=64, help="the servers' --prefix-cache-mb")
    ap.add_argument("--length", type=int, default=20, help="virtual tokens per prompt")
    ap.add_argument("--baseline-src", default=None, help="another checkout whose server also starts on the flat folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="many_prompts", help="results file name (bench/results/NAME.json/.md)")
    args = ap.parse_args()
    src = ROOT / "src"
    base = load_base_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="many-prompts-"))
    rows, extra = [], ["--prefix-cache-mb", str(args.prefix_cache_mb)] + (["--model", args.model] if args.model else [])
    try:
        folders = {"empty": (tmp / "empty", 0), "flat": (tmp / "flat", args.flat), "nested": (tmp / "nested", args.nested)}
        names = {}
        for kind, (folder, n) in folders.items():
            folder.mkdir()
            t0 = time.perf_counter()
            names[kind] = write_prompts(base, folder, n, 100 if kind == "nested" else 0, args.length, args.seed)
            print(f"wrote {n} prompt files ({kind}) in {time.perf_counter() - t0:.1f} s", flush=True)
        del base
        servers = [("this branch", kind, src) for kind in folders]
        if args.baseline_src:
            servers.append(("baseline", "flat", Path(args.baseline_src).resolve() / "src"))
        model_s = None
        for who, kind, where in servers:
            folder, n = folders[kind]
            srv, seconds = start(folder, where, extra if who != "baseline" else [], tmp / f"{who}-{kind}.log")
            try:
                row = {"server": who, "folder": kind, "files": n, "start-up s": round(seconds, 2), **rss_mb(srv.proc.pid)}
                model_s = seconds if kind == "empty" and who == "this branch" else model_s
                row["start-up minus model load s"] = round(seconds - model_s, 2) if model_s is not None else None
                print(row, flush=True)
                rows.append(row)
                if kind == "nested" and who == "this branch" and len(names[kind]) >= args.distinct:
                    rng = random.Random(args.seed)
                    for label, pool in (("one prompt", names[kind][:1]), (f"Zipf(1.1) over {args.distinct}",
                                                                          rng.sample(names[kind], args.distinct))):
                        r = {"server": who, "folder": kind, "files": n, "traffic": label, **traffic(srv, pool, args, rng)}
                        print(r, flush=True)
                        rows.append(r)
            finally:
                srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summarize(rows, args)


def summarize(rows: list[dict], args) -> None:
    start_rows = [r for r in rows if "traffic" not in r]
    load = [r for r in rows if "traffic" in r]
    summary = {"issue's old numbers (main 45c564b, 3,000 flat files, fp32)": f"start-up {OLD['startup_s']:.0f} s, RSS {OLD['rss_mb']:.0f} MB"}
    flat = next((r for r in start_rows if r["folder"] == "flat" and r["server"] == "this branch"), None)
    if flat:
        summary[f"start-up with {flat['files']} flat files, s"] = flat["start-up s"]
        summary[f"RSS with {flat['files']} flat files before traffic, MB"] = flat["rss_mb"]
    if len(load) == 2:
        one, many = load
        summary["Zipf / one-prompt throughput"] = round(many["requests/s"] / one["requests/s"], 3)
        summary["Zipf / one-prompt p99"] = round(many["p99 ms"] / one["p99 ms"], 3)
    notes = (f"Prompts: {args.length} virtual tokens, 5 labels, float16 files; servers `--dtype float32 --threads 1 "
             f"--max-batch 16 --prefix-cache-mb {args.prefix_cache_mb:g}` (the baseline server the same without `--prefix-cache-mb`, which it lacks), "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.requests} classifications per "
             f"traffic row, {args.concurrency} in flight. Start-up: spawn to first /healthz 200 (0.1 s poll); "
             "'minus model load' subtracts the empty-folder server's start-up. The store reads and checks the first 64 "
             "prompt files at start-up (sorted by name; prefixes computed on first use) and reads the rest on first "
             "use. Hit rate, evictions, prefills: "
             "deltas of the server's /metrics over the row.")
    write_results(args.name, rows, summary, notes=notes, columns=[
        "server", "folder", "files", "traffic", "start-up s", "start-up minus model load s", "rss_mb", "peak_rss_mb",
        "requests/s", "p50 ms", "p99 ms", "distinct", "hit rate", "evictions", "prefills", "prefill ms each",
        "resident", "cache MB", "limit MB"])


if __name__ == "__main__":
    main()
