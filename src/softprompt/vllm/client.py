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

Not here: building embeddings (embeds.py), the label request plan (labels.py), the start-up
checks (server_check.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..artifact import LoadedPrompt, check_compatible
from ..data import TaskSpec
from ..scoring import Generation
from ..tasks import task
from .embeds import EmbeddingTable, encode_embeds, request_embeds
from .labels import MAX_TOKEN_IDS, label_plan, label_scores
from .server_check import ServerInfo, VLLMError, _HTTPError, _one_line, _top_logprobs, check_server

@dataclass
class Classification:
    """One rank-classification answer."""

    label: str
    probs: dict[str, float]
    """Class probabilities: softmax of ``scores`` over the labels."""
    scores: list[float]
    """Summed log-probability of each label's tokens, in label order."""


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

    def _body(self, embeds: torch.Tensor | None, token_ids: Sequence[int] | None, **params: Any) -> dict:
        """A ``/v1/completions`` body: our sampling semantics (no top-k, no penalties), token ids back."""
        body: dict[str, Any] = {"model": self.info.model, "return_token_ids": True,
                                "return_tokens_as_token_ids": True, "top_k": 0, "repetition_penalty": 1.0,
                                "frequency_penalty": 0.0, "presence_penalty": 0.0, **params}
        if embeds is not None:
            body["prompt_embeds"] = encode_embeds(embeds)
        else:
            body["prompt"] = list(token_ids or [])
        return body

    def _complete(self, embeds: torch.Tensor | None = None, token_ids: Sequence[int] | None = None,
                  **params: Any) -> dict:
        """One completion; returns its choice (``token_ids`` and ``logprobs`` included)."""
        try:
            return self._http("/v1/completions", self._body(embeds, token_ids, **params))["choices"][0]
        except _HTTPError as e:
            raise VLLMError(f"vLLM at {self.url} refused a request ({e.status}): {e.message}") from None

    def stream(self, embeds: torch.Tensor | None = None, token_ids: Sequence[int] | None = None,
               **params: Any) -> Iterator[dict]:
        """One streamed completion: yields each server-sent chunk's choice (new ``token_ids``, and
        ``finish_reason`` on the last). Closing the generator closes the connection, which makes
        vLLM abort the request (a cancelled or timed-out row stops costing the server)."""
        body = json.dumps(self._body(embeds, token_ids, stream=True, **params)).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise VLLMError(f"vLLM at {self.url} refused a request ({e.code}): "
                            f"{_one_line(e.read().decode(errors='replace'))}") from None
        except (urllib.error.URLError, OSError) as e:
            raise VLLMError(f"cannot reach a vLLM server at {self.url}: {_one_line(getattr(e, 'reason', e))}") from None
        with resp:
            for raw in resp:  # server-sent events: "data: {json}" lines, then "data: [DONE]"
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise VLLMError(f"vLLM at {self.url} failed a request: {_one_line(chunk['error'])}")
                for choice in chunk.get("choices") or []:
                    yield choice

    def _map(self, fn, items: Sequence) -> list:
        """``fn`` over ``items`` with up to ``workers`` requests in flight, in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.workers, len(items))) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ start-up checks

    def check_server(self, served_model: str | None = None) -> ServerInfo:
        """Check that the server at ``url`` can serve prompts for this table's base model
        (server_check.py); raises :class:`VLLMError` in one sentence naming what is wrong."""
        return check_server(self, served_model)

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
        if not task(spec.kind).labelled:
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
