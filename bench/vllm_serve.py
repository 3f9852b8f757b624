"""Soft prompts on vLLM (prompt_embeds) vs our engine, side by side in one run.

- generation: N headline-style generations (article -> headline template, greedy, M new tokens) with
  a P-token prompt: our engine (``scoring.generate``, one batch) vs vLLM with ``prompt_embeds``
  (N concurrent requests through ``softprompt.vllm.VLLMClient``) vs vLLM with the bare token ids
  (no prompt: what a plain vLLM request costs);
- classification: N headlines x 5 topic labels (multi-token words included): ``classify_scores``
  (one batch) vs ``VLLMClient.label_scores`` (first-token + continuation requests).

Our engine runs first, before the server starts (the machine has few cores); each mode runs once
to warm up, then ``--rounds`` timed times (best kept). The server is started from .venv-vllm
(``make vllm-env``) in float32, eager, and stopped at the end.

Run: .venv/bin/python bench/vllm_serve.py        (default model, ~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import set_threads, write_results

from softprompt import SoftPrompt, load_base_model
from softprompt.base import resolve_model
from softprompt.data import TaskSpec
from softprompt.examples import load_bbc_headlines
from softprompt.model import PromptedModel
from softprompt.scoring import classify_scores, generate
from softprompt.vllm import EmbeddingTable, VLLMClient
from softprompt.vllm.launch import start_vllm

GEN = TaskSpec("generate", "Article: {input}\nHeadline:", max_length=96)
CLS = TaskSpec("classify", "Headline: {text}\nTopic:", labels=["business", "entertainment", "politics", "sports",
                                                                "science and technology"])


def best(fn, rounds: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="requests per mode")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of our engine")
    args = ap.parse_args()
    set_threads(args.threads)

    base = load_base_model()
    pm = PromptedModel(base)
    tok = base.tokenizer
    prompt = SoftPrompt.initialize(base.embedding, tok, args.prompt_length, "text",
                                   text="Write a short news headline for the article").weight.detach()  # (P, d)
    rng = random.Random(0)
    examples = rng.sample(load_bbc_headlines(), args.n)
    gen_ids = [GEN.source_ids(tok, e.source) for e in examples]
    cls_ids = [CLS.source_ids(tok, e.target) for e in examples]
    label_ids = CLS.label_ids(tok)
    T = sum(map(len, gen_ids)) / len(gen_ids)

    with torch.no_grad():
        t_ours, ours = best(lambda: generate(pm, prompt, gen_ids, max_new_tokens=args.new_tokens), args.rounds)
        c_ours, ours_scores = best(lambda: classify_scores(pm, prompt, cls_ids, label_ids), args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        srv = start_vllm(resolve_model(None)[1], log=Path(tmp) / "serve.log")
        startup = time.perf_counter() - t0
        try:
            client = VLLMClient(srv.url, EmbeddingTable.load(None), workers=args.n)
            t_emb, theirs = best(lambda: client.generate(prompt, gen_ids, max_tokens=args.new_tokens), args.rounds)
            t_ids, _ = best(lambda: client.generate(None, gen_ids, max_tokens=args.new_tokens, bare_as_ids=True),
                            args.rounds)
            t_bare_emb, _ = best(lambda: client.generate(None, gen_ids, max_tokens=args.new_tokens), args.rounds)
            c_vllm, vllm_scores = best(lambda: client.label_scores(prompt, cls_ids, label_ids), args.rounds)
        finally:
            srv.stop()

    same = sum(a.token_ids == b.token_ids for a, b in zip(theirs, ours))
    pdiff = float((vllm_scores.softmax(-1) - ours_scores.softmax(-1)).abs().max())
    toks = sum(len(g.token_ids) for g in ours)
    rows = [
        {"mode": "ours: scoring.generate (batch)", "task": "generate", "seconds": t_ours, "per_s": args.n / t_ours,
         "vs_ours": 1.0},
        {"mode": "vLLM prompt_embeds", "task": "generate", "seconds": t_emb, "per_s": args.n / t_emb,
         "vs_ours": t_ours / t_emb},
        {"mode": "vLLM bare token ids (no prompt)", "task": "generate", "seconds": t_ids, "per_s": args.n / t_ids,
         "vs_ours": t_ours / t_ids},
        {"mode": "vLLM bare, as embeddings", "task": "generate", "seconds": t_bare_emb,
         "per_s": args.n / t_bare_emb, "vs_ours": t_ours / t_bare_emb},
        {"mode": "ours: classify_scores (batch)", "task": "classify", "seconds": c_ours, "per_s": args.n / c_ours,
         "vs_ours": 1.0},
        {"mode": "vLLM prompt_embeds (first token + continuations)", "task": "classify", "seconds": c_vllm,
         "per_s": args.n / c_vllm, "vs_ours": c_ours / c_vllm},
    ]
    summary = {"requests": args.n, "new_tokens": args.new_tokens, "prompt_length": args.prompt_length,
               "mean_source_tokens": round(T, 1), "generated_tokens_ours": toks,
               "greedy_rows_identical": f"{same}/{args.n}", "max_prob_diff": pdiff,
               "label_requests_per_text": len(set(tuple(x[:j]) for x in label_ids for j in range(len(x)))),
               "vllm_startup_s": round(startup, 1)}
    write_results("vllm_serve", rows, summary, columns=["task", "mode", "seconds", "per_s", "vs_ours"],
                  notes="per_s: requests (texts) per second; vs_ours: speed relative to our engine on the same "
                        "task (>1 = faster). vLLM runs float32, --enforce-eager, on the same CPU cores, after our "
                        "engine finished. Best of --rounds after one warm-up.")


if __name__ == "__main__":
    main()
