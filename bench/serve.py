"""Serving throughput: `softprompt serve` with 4 prompts vs the same server with the bare model
(the limit) vs a straightforward PEFT server (one request at a time, prompt recomputed per call),
and, when the vLLM venv exists (``make vllm-env``), `softprompt serve --backend vllm` with the same
prompts vs the same vLLM-backed server with the bare model (the vLLM limit: vLLM has no rank
classification of its own, so the bare requests go through the same front end, without a prompt).

Every server runs as its own process on 127.0.0.1; one client process drives the same seeded
mixed-task request list (3 classification prompts, 1 generation prompt) from a bounded number of
concurrent httpx clients, and records requests/s and p50/p99 latency. Modes alternate over
``--rounds`` so machine noise hits all of them alike; the vLLM modes run after the others (one
vLLM server, float32, started once from the vLLM venv, would otherwise share the cores while they
are measured). Servers are killed at the end.

Run: .venv/bin/python bench/serve.py            (default model, ~5 min on 2 cores)
     .venv/bin/python bench/serve.py --model DIR --requests 20 --rounds 1   (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import set_threads, write_results

from softprompt import PromptMeta, SoftPrompt, load_base_model, save_prompt
from softprompt.distributed.launch import free_port
from softprompt.evaluate.baselines import cut_tokens
from softprompt.data import TaskSpec
from softprompt.examples import load_bbc_headlines, load_bbc_news, load_tweet_sentiment
from softprompt.artifact.peft import export_peft

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
PROMPTS: dict[str, TaskSpec] = {
    "topic": TaskSpec("classify", "Text: {text}\nTopic:", labels=TOPICS),
    "headline-topic": TaskSpec("classify", "Headline: {text}\nTopic:", labels=TOPICS),
    "sentiment": TaskSpec("classify", "Tweet: {text}\nSentiment:", labels=["negative", "neutral", "positive"]),
    "headline": TaskSpec("generate", "Article: {input}\nHeadline:"),
}
"""The 4 served prompts: name -> task."""
VLLM, VLLM_BARE = "softprompt --backend vllm", "vLLM bare model (limit)"


def make_prompts(base, out: Path, length: int) -> None:
    """Write the 4 prompt files (initialised, not trained: serving cost does not depend on the
    values) and, next to them, the same prompts as PEFT adapters + tasks.json."""
    (out / "sp").mkdir(parents=True)
    for i, (name, spec) in enumerate(PROMPTS.items()):
        init = "labels" if spec.kind == "classify" else "vocab"
        p = SoftPrompt.initialize(base.embedding, base.tokenizer, length, init, labels=spec.labels, seed=i)
        meta = PromptMeta.for_base(base, length, **spec.to_meta())
        path = save_prompt(out / "sp" / f"{name}.safetensors", p.weight, meta)
        export_peft(path, out / "peft" / name, base=base)
    tasks = {n: {"kind": s.kind, "template": s.template, "labels": s.labels} for n, s in PROMPTS.items()}
    (out / "peft" / "tasks.json").write_text(json.dumps(tasks))


def make_requests(tokenizer, n: int, seed: int, max_text_tokens: int, max_new_tokens: int, gen_share: float):
    """The seeded mixed-task request list: [(prompt name, text)] and the bodies for each mode."""
    rng = random.Random(seed)
    news = [e.source for e in rng.sample(load_bbc_news(), 200)]
    heads = [e.target for e in rng.sample(load_bbc_headlines(), 200)]
    tweets = [e.source for e in rng.sample(load_tweet_sentiment(), 200)]
    pools = {"topic": news, "headline-topic": heads, "sentiment": tweets, "headline": news}
    cls = [k for k, s in PROMPTS.items() if s.kind == "classify"]
    items = []
    for _ in range(n):
        name = "headline" if rng.random() < gen_share else rng.choice(cls)
        items.append((name, cut_tokens(tokenizer, rng.choice(pools[name]), max_text_tokens)))
    modes: dict[str, list[tuple[str, dict]]] = {"softprompt": [], "bare model (limit)": [], "PEFT": [],
                                                VLLM: [], VLLM_BARE: []}
    for name, text in items:
        spec = PROMPTS[name]
        if spec.kind == "classify":
            body = {"text": text, "prompt": name}
            bare = {"text": text, "labels": spec.labels, "template": spec.template}
            route = "/v1/classify"
        else:
            body = {"text": text, "prompt": name, "max_new_tokens": max_new_tokens}
            bare = {"text": spec.render(text), "max_new_tokens": max_new_tokens}
            route = "/v1/generate"
        modes["softprompt"].append((route, body))
        modes["bare model (limit)"].append((route, bare))
        modes["PEFT"].append((route, body))
        modes[VLLM].append((route, body))
        modes[VLLM_BARE].append((route, bare))
    return modes


class Server:
    """A server subprocess on 127.0.0.1, killed (its whole process group) on exit."""

    def __init__(self, cmd: list[str], port: int, log: Path, ready_timeout: float = 300, poll: float = 0.5):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < ready_timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self.stop()
        raise SystemExit(f"server did not start within {ready_timeout:.0f} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


async def drive(url: str, requests: list[tuple[str, dict]], concurrency: int, timeout: float) -> dict:
    """Send every request (at most ``concurrency`` in flight); wall time, latencies, tokens."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(route: str, body: dict) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(route, json=body)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                elif "tokens" in r.json():
                    tokens.append(r.json()["tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(route, body) for route, body in requests))
        wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    lat.sort()
    return {"wall": wall, "rps": len(requests) / wall, "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], "gen_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=120, help="requests per measured run")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every mode")
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--max-text-tokens", type=int, default=150, help="input texts cut to this many tokens")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--gen-share", type=float, default=0.25, help="share of generation requests")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="softprompt server weights")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true", help="no --backend vllm modes (default: run them if the venv exists)")
    ap.add_argument("--vllm-venv", default=None, help="the vLLM venv (default: $SOFTPROMPT_VLLM_VENV, else .venv-vllm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serve", help="results name (results/NAME.json, .md)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every server (default: one per core)")
    args = ap.parse_args()
    set_threads(args.threads)
    if not 1 <= args.concurrency <= 64 or not 1 <= args.requests <= 5000 or not 1 <= args.rounds <= 10:
        raise SystemExit("--concurrency 1..64, --requests 1..5000, --rounds 1..10")

    load0 = os.getloadavg()[0]
    from softprompt.vllm.launch import vllm_venv

    use_vllm = not args.skip_vllm and ((Path(args.vllm_venv) if args.vllm_venv else vllm_venv()) / "bin" / "vllm").is_file()
    vllm_start = None
    base = load_base_model(args.model)
    from softprompt.base import resolve_model

    model_path = resolve_model(args.model)[1]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    make_prompts(base, work, args.prompt_length)
    modes = make_requests(base.tokenizer, args.requests, args.seed, args.max_text_tokens, args.max_new_tokens,
                          args.gen_share)
    warm = {m: reqs[:4] for m, reqs in modes.items()}
    base_name = base.name
    del base

    py = sys.executable
    sp_cmd = [py, "-m", "softprompt", "serve", "--prompts", str(work / "sp"), "--host", "127.0.0.1",
              "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-queue", "1024",
              "--request-timeout", "600"]
    if args.model:
        sp_cmd += ["--model", args.model]
    peft_cmd = [py, str(BENCH / "peft_server.py"), "--adapters", str(work / "peft"), "--model", model_path]
    if args.threads:
        sp_cmd += ["--threads", str(args.threads)]
        peft_cmd += ["--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    servers: list[Server] = []
    vllm_srv = None
    try:
        order = ["softprompt", "bare model (limit)"] + ([] if args.skip_peft else ["PEFT"])
        groups = [order] + ([[VLLM, VLLM_BARE]] if use_vllm else [])
        for group in groups:
            if group[0] == VLLM:
                from softprompt.vllm.launch import start_vllm

                t0 = time.perf_counter()
                vllm_srv = start_vllm(model_path, log=work / "vllm.log", venv=Path(args.vllm_venv) if args.vllm_venv else None)
                vllm_start = time.perf_counter() - t0
            for r in range(args.rounds):
                for mode in group:
                    port = free_port()
                    if mode in (VLLM, VLLM_BARE):
                        cmd = sp_cmd + ["--backend", "vllm", "--vllm-url", vllm_srv.url]
                    else:
                        cmd = peft_cmd if mode == "PEFT" else sp_cmd
                    srv = Server(cmd + ["--port", str(port)], port, work / f"{mode.split()[0]}-{r}.log")
                    servers.append(srv)
                    asyncio.run(drive(srv.url, warm[mode], args.concurrency, 600))
                    res = asyncio.run(drive(srv.url, modes[mode], args.concurrency, 600))
                    srv.stop()
                    runs[mode].append(res)
                    print(f"round {r + 1} {mode}: {res['rps']:.2f} req/s, p50 {res['p50']:.2f} s, p99 {res['p99']:.2f} s",
                          flush=True)
    finally:
        for srv in servers:
            srv.stop()
        if vllm_srv is not None:
            vllm_srv.stop()
    load1 = os.getloadavg()[0]

    def agg(mode: str) -> dict:
        rs = runs[mode]
        rps = [x["rps"] for x in rs]
        toks = [t for x in rs for t in x["gen_tokens"]]
        return {"server": mode, "requests/s": statistics.mean(rps), "min req/s": min(rps), "max req/s": max(rps),
                "p50 latency s": statistics.mean(x["p50"] for x in rs), "p99 latency s": statistics.mean(x["p99"] for x in rs),
                "mean generated tokens": statistics.mean(toks) if toks else None}

    rows = [agg(m) for m in runs if runs[m]]
    by = {r["server"]: r for r in rows}
    sp = by["softprompt"]["requests/s"]
    summary = {"softprompt / bare-model limit": sp / by["bare model (limit)"]["requests/s"]}
    if "PEFT" in by:
        summary["softprompt / PEFT"] = sp / by["PEFT"]["requests/s"]
    if VLLM in by:
        v = by[VLLM]["requests/s"]
        summary["vllm backend / vLLM bare limit"] = v / by[VLLM_BARE]["requests/s"]
        summary["vllm backend / softprompt (transformers)"] = v / sp
        if "PEFT" in by:
            summary["vllm backend / PEFT"] = v / by["PEFT"]["requests/s"]
        summary["vllm startup s"] = vllm_start
    summary["target limit ratio"] = ">= 0.9"
    summary["target PEFT ratio"] = ">= 5"
    summary["load average before/after"] = f"{load0:.2f} / {load1:.2f}"
    notes = (f"Base model: {base_name}; softprompt server `--dtype {args.dtype} --max-batch {args.max_batch}`; "
             f"PEFT baseline float32, one request at a time; torch threads per server: {args.threads or 'default'}. {args.requests} requests per run "
             f"({args.gen_share:.0%} generation of {args.max_new_tokens} new tokens, the rest classification over "
             f"3 prompts), {args.concurrency} concurrent clients, {args.rounds} alternating rounds; inputs cut to "
             f"{args.max_text_tokens} tokens; {args.prompt_length} virtual tokens per prompt. The bare-model limit "
             "sends the same texts and labels with no prompt (templates applied, generation input pre-rendered)."
             + (" vLLM modes: one vLLM server (float32, --enforce-eager, CPU; its own OpenMP threads), started "
                "after the other modes finished; softprompt --backend vllm sends each row as a concurrent "
                "/v1/completions request with prompt_embeds (classification: first-token + continuation "
                "requests per label prefix)." if use_vllm else ""))
    write_results(args.name, rows, summary, notes=notes)


if __name__ == "__main__":
    main()
