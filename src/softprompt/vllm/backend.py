"""``softprompt serve --backend vllm``: the engine's model steps run on a vLLM server.

This process keeps the base model's tokenizer and input-embedding matrix only (one tensor read
from the checkpoint, embeds.py), never the model: the prompt bank wraps each prompt's rows
(steps.embeds_prefix) instead of running the model for its key/value prefix. The server is
either one already running (``--vllm-url``) or launched here from the vLLM venv
(``--vllm-python``, default ``$SOFTPROMPT_VLLM_VENV`` or ``.venv-vllm``) on the same model folder;
it is checked before the server starts (server_check.py: reachable, ``--enable-prompt-embeds``,
the same base model, a vLLM with the features we need), each failure one line.

Not here: the steps (steps.py), the client (client.py), the registry of backends (serve/engine.py).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from ..errors import ConfigError
from ..serve.backend import Backend
from ..serve.config import EngineConfig, ServeConfig
from ..serve.metrics import Metrics
from .client import VLLMClient
from .embeds import EmbeddingTable
from .launch import LAUNCH_BLOCK_SIZE, VLLMServer, start_vllm, vllm_venv
from .steps import BlockCheck, VLLMSteps

log = logging.getLogger("softprompt.serve.engine")

LAUNCH_DTYPES = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
"""``--dtype`` -> the launched server's ``--dtype`` (auto: float32, the precision our engine's
answers are compared in; vLLM's CPU bf16 path is another question)."""


class FrontEnd:
    """Stands in for :class:`~softprompt.model.PromptedModel` on a vLLM-backed server: the bank
    and ``/healthz`` read only ``.base`` (here the embedding table: name, width, fingerprint,
    tokenizer)."""

    def __init__(self, table: EmbeddingTable):
        self.base = table


def _launch(config: ServeConfig, table: EmbeddingTable) -> VLLMServer:
    # not resolve(): a venv's bin/python is a link to the interpreter it was made from
    venv = Path(config.vllm_python).absolute().parents[1] if config.vllm_python else vllm_venv()
    log = Path(tempfile.mkdtemp(prefix="softprompt-vllm-")) / "serve.log"
    try:
        return start_vllm(table.source, log=log, venv=venv, dtype=LAUNCH_DTYPES[config.dtype])
    except FileNotFoundError:
        raise ConfigError(f"--backend vllm: no vLLM in {venv} (build it with `make vllm-env`, or give "
                          "--vllm-url of a running `vllm serve --enable-prompt-embeds`)") from None
    except RuntimeError as e:
        last = (str(e).strip().splitlines() or [""])[-1]
        raise ConfigError(f"--backend vllm: the vLLM server did not start (log: {log}): {last}") from None


def from_config(config: ServeConfig, base=None) -> Backend:
    """The ``vllm`` entry of ``softprompt.backends``: vLLM runs the model, so a loaded ``base`` is not used."""
    return vllm_backend(config)


def vllm_backend(config: ServeConfig) -> Backend:
    """Connect to (or launch) the vLLM server and check it; raises a one-line error at start."""
    table = EmbeddingTable.load(config.model)
    server = None if config.vllm_url else _launch(config, table)
    try:
        client = VLLMClient(config.vllm_url or server.url, table, timeout=max(60.0, config.engine.request_timeout))
    except BaseException:
        if server is not None:
            server.stop()
        raise
    made: list[VLLMSteps] = []

    def steps(engine: EngineConfig, metrics: Metrics, lock: threading.Lock) -> VLLMSteps:
        made.append(VLLMSteps(client, engine, metrics))
        return made[-1]

    def close() -> None:
        for s in made:
            s.close()
        if server is not None:
            server.stop()

    info = client.info
    block = info.block_size or (LAUNCH_BLOCK_SIZE if server is not None else None)
    if info.prefix_caching is False:
        log.warning("vLLM at %s runs without prefix caching: every request computes its prompt's rows "
                    "again (start it with --enable-prefix-caching)", client.url)
    how = " (launched by this server)" if server is not None else ""
    return Backend("vllm", FrontEnd(table), steps, BlockCheck(block),
                   f"{table.name} via vLLM {client.info.version} at {client.url}{how}", close)
