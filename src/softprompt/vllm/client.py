"""An HTTP client that runs soft prompts on ``vllm serve --enable-prompt-embeds``.

Each row is one ``/v1/completions`` request whose ``prompt_embeds`` is ``[prompt ; E[source]]``;
requests go out concurrently so that vLLM batches them (mixed prompts in one batch are just
requests with other embeddings). Generation returns :class:`softprompt.scoring.Generation`, rank
classification the same label and class probabilities as our engine (summed label log-probs,
softmax over labels; labels.py says how the log-probs are read).

``connect`` checks the server before the first request, each failure one sentence:
unreachable URL, no ``--enable-prompt-embeds``, a vLLM whose completions lack ``prompt_embeds`` or
``logprob_token_ids``, another base model (hidden size, vocabulary, tokenizer, or log-probs of the
same tokens sent as ids and as our embeddings).

Not here: building embeddings (embeds.py), the label request plan (labels.py).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..artifact import LoadedPrompt, check_compatible
from ..data import TaskSpec
from ..errors import SoftpromptError
from ..scoring import Generation
from .embeds import EmbeddingTable, encode_embeds, request_embeds
from .labels import MAX_TOKEN_IDS, label_plan, label_scores

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


@dataclass
class Classification:
    """One rank-classification answer."""

    label: str
    probs: dict[str, float]
    """Class probabilities: softmax of ``scores`` over the labels."""
    scores: list[float]
    """Summed log-probability of each label's tokens, in label order."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


class VLLMClient:
    """Soft prompts on a running vLLM server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        table: the base model's tokenizer and embedding matrix (:meth:`EmbeddingTable.load`).
        served_model: the ``model`` id to send; default: the server's first (only) model.
        timeout: seconds per HTTP request.
        workers: requests in flight at once (vLLM batches concurrent requests).
        check: run the start-up checks now (see the module docstring).
        max_targets: most label tokens read per request (the server's ``--max-logprobs``, default 20).
    """

    def __init__(self, url: str, table: EmbeddingTable, *, served_model: str | None = None,
                 timeout: float = 300.0, workers: int = 32, check: bool = True, max_targets: int = MAX_TOKEN_IDS):
        self.url = url.rstrip("/")
        self.table = table
        self.timeout = timeout
        self.workers = workers
        self.max_targets = max_targets
        self.info = ServerInfo(self.url, "", served_model or "", None)
        if check:
            self.info = self.check_server(served_model)

    @classmethod
    def connect(cls, url: str, model: str | None = None, **kw: Any) -> "VLLMClient":
        """Load ``model``'s embedding table (None: the default model) and check the server at ``url``."""
        return cls(url, EmbeddingTable.load(model), **kw)

    # ------------------------------------------------------------------ HTTP

    def _http(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                err = json.loads(raw)
                msg = err.get("error", err) if isinstance(err, dict) else err
                msg = msg.get("message", msg) if isinstance(msg, dict) else msg
            except ValueError:
                msg = raw
            raise _HTTPError(e.code, _one_line(msg)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VLLMError(f"cannot reach a vLLM server at {self.url}: {_one_line(reason)}") from None

    def _complete(self, embeds: torch.Tensor | None = None, token_ids: Sequence[int] | None = None,
                  **params: Any) -> dict:
        """One completion; returns its choice (``token_ids`` and ``logprobs`` included)."""
        body: dict[str, Any] = {"model": self.info.model, "return_token_ids": True,
                                "return_tokens_as_token_ids": True, "top_k": 0, "repetition_penalty": 1.0,
                                "frequency_penalty": 0.0, "presence_penalty": 0.0, **params}
        if embeds is not None:
            body["prompt_embeds"] = encode_embeds(embeds)
        else:
            body["prompt"] = list(token_ids or [])
        try:
            return self._http("/v1/completions", body)["choices"][0]
        except _HTTPError as e:
            raise VLLMError(f"vLLM at {self.url} refused a request ({e.status}): {e.message}") from None

    def _map(self, fn, items: Sequence) -> list:
        """``fn`` over ``items`` with up to ``workers`` requests in flight, in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.workers, len(items))) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ start-up checks

    def _probe(self, embeds: bool, ids: list[int], targets: list[int]) -> dict[int, float]:
        """Greedy one-token completion of ``ids``; {token id: log-prob} of ``targets`` and the pick."""
        e = request_embeds(None, self.table, ids) if embeds else None
        body: dict[str, Any] = {"model": self.info.model, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                                "logprob_token_ids": targets, "return_tokens_as_token_ids": True}
        if e is not None:
            body["prompt_embeds"] = encode_embeds(e)
        else:
            body["prompt"] = ids
        choice = self._http("/v1/completions", body)["choices"][0]
        return _top_logprobs(choice)[0]

    def check_server(self, served_model: str | None = None) -> ServerInfo:
        """Check that the server at ``url`` can serve prompts for this table's base model.

        Raises:
            VLLMError: one sentence naming what is wrong.
        """
        try:
            version = str(self._http("/version").get("version", ""))
        except _HTTPError as e:
            raise VLLMError(f"{self.url} does not look like a vLLM server: GET /version answered {e.status}") from None
        try:
            models = self._http("/v1/models").get("data", [])
        except _HTTPError as e:
            raise VLLMError(f"{self.url} does not look like a vLLM server: GET /v1/models answered {e.status}") from None
        ids = [m.get("id") for m in models]
        if not ids:
            raise VLLMError(f"vLLM at {self.url} serves no model")
        if served_model is not None and served_model not in ids:
            raise VLLMError(f"vLLM at {self.url} serves {ids}, not {served_model!r}")
        model = served_model or ids[0]
        max_len = next((m.get("max_model_len") for m in models if m.get("id") == model), None)
        self.info = ServerInfo(self.url, version, model, max_len)
        where = f"vLLM {version} at {self.url} (model {model!r})"

        tok = self.table.tokenizer
        ids_probe = list(tok(PROBE_TEXT, add_special_tokens=True)["input_ids"])
        try:
            theirs = self._http("/tokenize", {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": True})
        except _HTTPError as e:
            raise VLLMError(f"{where}: POST /tokenize answered {e.status}: {e.message}") from None
        if list(theirs.get("tokens", [])) != ids_probe:
            raise VLLMError(f"{where} tokenizes differently from {self.table.name!r}: it is another base model")

        last = self.table.vocab_size - 1
        try:
            by_ids = self._probe(False, ids_probe, [last])
        except _HTTPError as e:
            if "vocab" in e.message.lower():
                raise VLLMError(f"{where} has a smaller vocabulary than {self.table.name!r} "
                                f"({self.table.vocab_size} tokens): it is another base model") from None
            if "logprob_token_ids" in e.message:
                raise VLLMError(f"{where} does not take logprob_token_ids on /v1/completions, which rank "
                                f"classification needs (tested with vLLM {TESTED_VERSION}): {e.message}") from None
            raise VLLMError(f"{where} refused a token-id probe ({e.status}): {e.message}") from None
        if last not in by_ids:
            raise VLLMError(f"{where} ignores logprob_token_ids on /v1/completions, which rank classification "
                            f"needs: upgrade vLLM (tested with {TESTED_VERSION})")
        try:
            by_embeds = self._probe(True, ids_probe, [last])
        except _HTTPError as e:
            m = e.message
            if "--enable-prompt-embeds" in m or "enable_prompt_embeds" in m:
                raise VLLMError(f"{where} was started without --enable-prompt-embeds; restart it with that flag") from None
            if "hidden_size" in m:
                raise VLLMError(f"{where} is another base model: embedding width differs from "
                                f"{self.table.name!r}'s {self.table.dim} ({m})") from None
            raise VLLMError(f"{where} does not accept prompt_embeds on /v1/completions (needs a vLLM with "
                            f"embedding inputs; tested with {TESTED_VERSION}): {m}") from None
        pick = max([t for t in by_ids if t != last] or [last], key=by_ids.get)  # the greedy token
        diffs = [abs(by_ids[t] - by_embeds.get(t, -math.inf)) for t in {pick, last}]
        if max(diffs) > PROBE_TOLERANCE:
            raise VLLMError(f"{where} is another base model: the same tokens sent as ids and as "
                            f"{self.table.name!r}'s embeddings give different log-probabilities")
        return self.info

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: torch.Tensor | LoadedPrompt | None,
        source_ids: Sequence[Sequence[int]],
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompts: Sequence[torch.Tensor | LoadedPrompt | None] | None = None,
        bare_as_ids: bool = False,
    ) -> list[Generation]:
        """Continue every row's ``[prompt ; source]``, as ``scoring.generate`` does.

        Args:
            prompt: one (P, d) prompt for every row, or None for the bare tokens.
            source_ids: each row's token ids (template applied, special tokens included).
            seed: row i samples with seed ``seed + i`` (a row's text does not depend on its batch).
            prompts: instead of ``prompt``, one prompt per row (mixed prompts in one batch).
            bare_as_ids: send rows without a prompt as token ids, not embeddings (what a plain
                vLLM request costs; the same tokens come back).
        Returns:
            One :class:`Generation` per row; ``finish_reason`` is "eos", "stop" or "length".
        """
        rows = list(prompts) if prompts is not None else [prompt] * len(source_ids)
        if len(rows) != len(source_ids):
            raise ValueError(f"got {len(rows)} prompts for {len(source_ids)} rows")
        eos = self.table.tokenizer.eos_token_id

        def one(i: int) -> Generation:
            params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
            if seed is not None:
                params["seed"] = seed + i
            if stop:
                params["stop"] = list(stop)
            if rows[i] is None and bare_as_ids:
                c = self._complete(None, source_ids[i], **params)
            else:
                c = self._complete(request_embeds(_tensor(rows[i]), self.table, source_ids[i]), **params)
            toks = list(c.get("token_ids") or [])
            if c.get("finish_reason") == "length":
                reason = "length"
            elif isinstance(c.get("stop_reason"), str):
                reason = "stop"
            else:
                reason = "eos"
            if reason == "eos" and toks and toks[-1] == eos:
                toks = toks[:-1]  # our engine does not count EOS as a generated token
            return Generation(c.get("text", "").strip(), toks, reason)

        return self._map(one, range(len(source_ids)))

    # ------------------------------------------------------------------ classification

    def label_scores(
        self,
        prompt: torch.Tensor | LoadedPrompt | None,
        source_ids: Sequence[Sequence[int]],
        label_ids: Sequence[Sequence[int]],
        prompts: Sequence[torch.Tensor | LoadedPrompt | None] | None = None,
    ) -> torch.Tensor:
        """Summed log p(label tokens | prompt, source) of every row and label, (B, C), as
        ``scoring.classify_scores`` computes it; ``softmax(-1)`` gives class probabilities."""
        rows = list(prompts) if prompts is not None else [prompt] * len(source_ids)
        plan = label_plan(label_ids, self.max_targets)
        jobs = [(b, s) for b in range(len(source_ids)) for s in range(len(plan))]  # every row x step

        def one(job: tuple[int, int]) -> dict[int, float]:
            b, s = job
            step = plan[s]
            embeds = request_embeds(_tensor(rows[b]), self.table, list(source_ids[b]) + list(step.prefix))
            c = self._complete(embeds, max_tokens=1, temperature=0.0, logprobs=len(step.targets),
                               logprob_token_ids=list(step.targets))
            return _top_logprobs(c)[0]

        answers = self._map(one, jobs)
        S = len(plan)
        out = [label_scores(label_ids, plan, answers[b * S : (b + 1) * S]) for b in range(len(source_ids))]
        return torch.tensor(out, dtype=torch.float32)  # (B, C)

    def classify(self, prompt: LoadedPrompt, texts: Sequence[str], max_length: int = 256) -> list[Classification]:
        """Rank-classify ``texts`` with a classification prompt file's template and labels."""
        spec = TaskSpec.from_meta(prompt.meta, max_length=max_length)
        if spec.kind != "classify":
            raise VLLMError(f"{prompt.path or 'the prompt'} is a {spec.kind} prompt, not a classification prompt")
        check_compatible(prompt.meta, self.table, str(prompt.path or "prompt"))  # table duck-types BaseModel
        tok = self.table.tokenizer
        scores = self.label_scores(prompt, [spec.source_ids(tok, t) for t in texts], spec.label_ids(tok))  # (B, C)
        probs = scores.softmax(-1)  # (B, C)
        labels = list(spec.labels or [])
        return [Classification(labels[int(p.argmax())], {l: float(x) for l, x in zip(labels, p)}, s.tolist())
                for s, p in zip(scores, probs)]

    def complete(self, prompt: LoadedPrompt, texts: Sequence[str], max_length: int = 256,
                 **params: Any) -> list[Generation]:
        """Generate for ``texts`` with a prompt file's template (task-less prompts take the text as is)."""
        tok = self.table.tokenizer
        check_compatible(prompt.meta, self.table, str(prompt.path or "prompt"))
        if prompt.meta.task is None:
            ids = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
        else:
            spec = TaskSpec.from_meta(prompt.meta, max_length=max_length)
            ids = [spec.source_ids(tok, t) for t in texts]
        return self.generate(prompt, ids, **params)


def _tensor(prompt: torch.Tensor | LoadedPrompt | None) -> torch.Tensor | None:
    return prompt.tensor if isinstance(prompt, LoadedPrompt) else prompt


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
