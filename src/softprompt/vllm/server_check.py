"""The start-up checks of :class:`~softprompt.vllm.client.VLLMClient`: can the vLLM server at a URL
serve soft prompts for this base model? Each failure is one sentence: unreachable URL, not vLLM,
no ``--enable-prompt-embeds``, a vLLM whose completions lack ``prompt_embeds`` or
``logprob_token_ids``, another base model (tokenizer, vocabulary, hidden size, or different
log-probs for the same tokens sent as ids and as our embeddings).

Not here: the requests themselves (client.py).
"""

from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass, replace
from typing import Any

from ..errors import SoftpromptError
from .embeds import encode_embeds, request_embeds

PROBE_TEXT = "The capital of France is"
"""Sent once as token ids and once as our embeddings of them: the two answers must agree."""
PROBE_TOLERANCE = 0.05
"""Most |log-prob difference| of the probe token between the two paths (bf16 servers differ ~1e-2)."""
TESTED_VERSION = "0.32.0"


class VLLMError(SoftpromptError):
    """The vLLM server cannot serve this prompt (unreachable, misconfigured, another model)."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServerInfo:
    """What the start-up checks learned about the server."""

    url: str
    version: str
    model: str
    """The served model id, sent as ``model`` in every request."""
    max_model_len: int | None
    block_size: int | None = None
    """vLLM's KV block in tokens (its prefix cache keeps whole blocks); None where it does not say."""
    prefix_caching: bool | None = None
    """Whether vLLM caches prefixes; None where it does not say (``--disable-log-stats`` hides both)."""


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def cache_config(metrics: str) -> tuple[int | None, bool | None]:
    """(block size, prefix caching) from vLLM's Prometheus text: the labels of its
    ``vllm:cache_config_info`` gauge; (None, None) where the gauge is absent (pure)."""
    line = next((ln for ln in metrics.splitlines() if ln.startswith("vllm:cache_config_info{")), None)
    if line is None:
        return None, None
    labels = dict(_LABEL.findall(line[: line.rfind("}")]))
    block = labels.get("block_size", "")
    caching = labels.get("enable_prefix_caching")
    return (int(block) if block.isdigit() else None), (None if caching is None else caching == "True")


def _read_cache_config(url: str, timeout: float) -> tuple[int | None, bool | None]:
    """:func:`cache_config` of the server's ``/metrics``; (None, None) when it cannot be read."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
            return cache_config(resp.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None, None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]



def _probe(client, embeds: bool, ids: list[int], targets: list[int]) -> dict[int, float]:
    """Greedy one-token completion of ``ids``; {token id: log-prob} of ``targets`` and the pick."""
    e = request_embeds(None, client.table, ids) if embeds else None
    body: dict[str, Any] = {"model": client.info.model, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                            "logprob_token_ids": targets, "return_tokens_as_token_ids": True}
    if e is not None:
        body["prompt_embeds"] = encode_embeds(e)
    else:
        body["prompt"] = ids
    choice = client._http("/v1/completions", body)["choices"][0]
    return _top_logprobs(choice)[0]

def check_server(client, served_model: str | None = None) -> ServerInfo:
    """Check that the server at ``url`` can serve prompts for this table's base model.

    Raises:
        VLLMError: one sentence naming what is wrong.
    """
    try:
        version = str(client._http("/version").get("version", ""))
    except _HTTPError as e:
        raise VLLMError(f"{client.url} does not look like a vLLM server: GET /version answered {e.status}") from None
    try:
        models = client._http("/v1/models").get("data", [])
    except _HTTPError as e:
        raise VLLMError(f"{client.url} does not look like a vLLM server: GET /v1/models answered {e.status}") from None
    ids = [m.get("id") for m in models]
    if not ids:
        raise VLLMError(f"vLLM at {client.url} serves no model")
    if served_model is not None and served_model not in ids:
        raise VLLMError(f"vLLM at {client.url} serves {ids}, not {served_model!r}")
    model = served_model or ids[0]
    max_len = next((m.get("max_model_len") for m in models if m.get("id") == model), None)
    client.info = ServerInfo(client.url, version, model, max_len)
    where = f"vLLM {version} at {client.url} (model {model!r})"

    tok = client.table.tokenizer
    ids_probe = list(tok(PROBE_TEXT, add_special_tokens=True)["input_ids"])
    try:
        theirs = client._http("/tokenize", {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": True})
    except _HTTPError as e:
        raise VLLMError(f"{where}: POST /tokenize answered {e.status}: {e.message}") from None
    if list(theirs.get("tokens", [])) != ids_probe:
        raise VLLMError(f"{where} tokenizes differently from {client.table.name!r}: it is another base model")

    last = client.table.vocab_size - 1
    try:
        by_ids = _probe(client, False, ids_probe, [last])
    except _HTTPError as e:
        if "vocab" in e.message.lower():
            raise VLLMError(f"{where} has a smaller vocabulary than {client.table.name!r} "
                            f"({client.table.vocab_size} tokens): it is another base model") from None
        if "logprob_token_ids" in e.message:
            raise VLLMError(f"{where} does not take logprob_token_ids on /v1/completions, which rank "
                            f"classification needs (tested with vLLM {TESTED_VERSION}): {e.message}") from None
        raise VLLMError(f"{where} refused a token-id probe ({e.status}): {e.message}") from None
    if last not in by_ids:
        raise VLLMError(f"{where} ignores logprob_token_ids on /v1/completions, which rank classification "
                        f"needs: upgrade vLLM (tested with {TESTED_VERSION})")
    try:
        by_embeds = _probe(client, True, ids_probe, [last])
    except _HTTPError as e:
        m = e.message
        if "--enable-prompt-embeds" in m or "enable_prompt_embeds" in m:
            raise VLLMError(f"{where} was started without --enable-prompt-embeds; restart it with that flag") from None
        if "hidden_size" in m:
            raise VLLMError(f"{where} is another base model: embedding width differs from "
                            f"{client.table.name!r}'s {client.table.dim} ({m})") from None
        raise VLLMError(f"{where} does not accept prompt_embeds on /v1/completions (needs a vLLM with "
                        f"embedding inputs; tested with {TESTED_VERSION}): {m}") from None
    pick = max([t for t in by_ids if t != last] or [last], key=by_ids.get)  # the greedy token
    diffs = [abs(by_ids[t] - by_embeds.get(t, -math.inf)) for t in {pick, last}]
    if max(diffs) > PROBE_TOLERANCE:
        raise VLLMError(f"{where} is another base model: the same tokens sent as ids and as "
                        f"{client.table.name!r}'s embeddings give different log-probabilities")
    block, caching = _read_cache_config(client.url, min(client.timeout, 10.0))
    client.info = replace(client.info, block_size=block, prefix_caching=caching)
    return client.info



def _top_logprobs(choice: dict) -> list[dict[int, float]]:
    """Per generated position, {token id: log-prob} (keys sent as "token_id:N")."""
    lp = choice.get("logprobs") or {}
    out = []
    for pos in lp.get("top_logprobs") or []:
        d: dict[int, float] = {}
        for k, v in (pos or {}).items():
            if k.startswith("token_id:"):
                d[int(k.split(":", 1)[1])] = float(v)
        out.append(d)
    if not out:
        raise VLLMError("vLLM returned no log-probabilities for a scoring request")
    return out
