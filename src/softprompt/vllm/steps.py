"""The serving engine's model steps on a vLLM server (``softprompt serve --backend vllm``).

:class:`VLLMSteps` implements :class:`~softprompt.serve.steps.ModelSteps` over a
:class:`~softprompt.vllm.client.VLLMClient`. vLLM batches by itself (continuous batching), so
every row goes out at once as its own HTTP request, from a thread pool; the scheduler's worker
never waits for a whole request:

- ``classify`` sends each row's label requests (rank classification, client.label_scores) and
  returns; ``score`` answers the jobs whose rows have all come back (an ensemble's members are
  averaged as our engine does, a row that fails fails its job alone);
- ``admit`` opens one streamed completion per generation row; the reading threads only collect
  token ids. ``step`` turns them into text on the worker thread with the in-process engine's own
  rules (EOS, stop strings, max tokens, the stream-safe prefix of the text), so both backends
  answer the same tokens with the same text; a row that is cancelled (client gone) or past its
  deadline is dropped and its connection closed, which aborts it on the server.

Prompts travel as input embeddings (``[prompt ; E[tokens]]``), so only shallow prompts can be
served: a deep prompt (per-layer key/value prefixes) is refused when loaded (:func:`embeds_prefix`).

Not here: HTTP (client.py), the queue and deadlines (serve/scheduler.py), limits (serve/limits.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import torch

from ..artifact import PromptMeta
from ..methods import check_backend
from ..prefix import PrefixKV
from ..serve.config import EngineConfig
from ..serve.errors import RequestTimeoutError
from ..serve.jobs import ClassifyResult, GenerateRequest, GenerateResult, Job, Row
from ..serve.metrics import Metrics
from ..textgen import FinishReason, TextStepper
from .client import VLLMClient, VLLMError
from .embeds import request_embeds

log = logging.getLogger("softprompt.serve.engine")

POLL_S = 0.005
"""Longest a step waits for news from the server threads before it returns to the scheduler
(which then takes new requests): the added latency of a new request while others run."""


@dataclass(frozen=True)
class EmbedsPrefix(PrefixKV):
    """A prompt as the vLLM backend holds it: its rows, no keys/values (the server computes them)."""

    rows: torch.Tensor | None = None
    """(P, d) float32 on the CPU."""


def embeds_prefix(name: str, tensor: torch.Tensor, meta: PromptMeta) -> EmbedsPrefix:
    """The prompt bank's hook on a vLLM backend: wrap a shallow prompt's rows; refuse a deep one."""
    check_backend(meta.method, "vllm", f"prompt {name!r}")
    rows = tensor.detach().to("cpu", torch.float32)  # (P, d)
    return EmbedsPrefix((), int(rows.shape[0]), rows)


@dataclass
class BlockCheck:
    """:func:`embeds_prefix` that also warns, once per server, when a prompt's rows do not fill
    whole KV blocks of vLLM: its prefix cache keeps only whole blocks, so the rows left over
    share a block with each request's text and are computed again on every request."""

    block_size: int | None
    """vLLM's KV block in tokens; None: unknown, no warning."""
    warned: bool = False

    def __call__(self, name: str, tensor: torch.Tensor, meta: PromptMeta) -> EmbedsPrefix:
        prefix = embeds_prefix(name, tensor, meta)
        left = prefix.length % self.block_size if self.block_size else 0
        if left and not self.warned:
            self.warned = True
            log.warning("prompt %r has %d virtual tokens and vLLM caches whole %d-token KV blocks: its last %d "
                        "rows are computed again on every request (this warning is shown once); prompts whose "
                        "length is a multiple of %d (train --prompt-length) are computed once",
                        name, prefix.length, self.block_size, left, self.block_size)
        return prefix


def _rows(row: Row) -> torch.Tensor | None:
    """A row's prompt rows (P, d), or None for the bare model."""
    return getattr(row.prefix, "rows", None)


@dataclass
class _Stream:
    """One generation row: filled by its reading thread, advanced by the worker thread."""

    job: Job
    text: TextStepper
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: list[int] = field(default_factory=list)  # token ids not yet seen by the worker
    ended: str | None = None  # the server's finish_reason, once the stream has ended
    error: BaseException | None = None


class VLLMSteps:
    """:class:`~softprompt.serve.steps.ModelSteps` on a vLLM server.

    Args:
        client: the checked client (its table gives the tokenizer and the embeddings).
        config: the engine's limits (``--request-timeout`` is named in timeout errors).
        metrics: where to count rows and tokens.
        workers: HTTP requests in flight at once (the server batches them).
    """

    def __init__(self, client: VLLMClient, config: EngineConfig, metrics: Metrics, workers: int = 64):
        self.client = client
        self.tokenizer = client.table.tokenizer
        self.config = config
        self.metrics = metrics
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._news = threading.Event()  # set by a server thread when a row has something new
        self._scoring: dict[Job, list[Future]] = {}  # classification job -> one future per row
        self._gen: list[_Stream] = []
        self._open_lock = threading.Lock()
        self.open_streams = 0
        """Streams from the server being read now (a cancelled row's closes at its next chunk)."""

    def _submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="softprompt-vllm")
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self._news.set())
        return fut

    def _wait(self) -> None:
        """Wait up to POLL_S for news from the server threads (no busy loop while rows run)."""
        if self._news.wait(POLL_S):
            self._news.clear()

    def close(self) -> None:
        """Drop the threads (requests in flight end on their own); the steps can be used again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the ModelSteps interface

    @property
    def scoring_jobs(self) -> list[Job]:
        return list(self._scoring)

    @property
    def generating_jobs(self) -> list[Job]:
        return [s.job for s in self._gen]

    def abort(self) -> list[Job]:
        jobs = self.generating_jobs + self.scoring_jobs  # failed by the scheduler: the readers see it and stop
        self._gen = []
        self._scoring.clear()
        return jobs

    # -- classification

    def classify(self, jobs: list[Job]) -> None:
        """Send every row's label requests; :meth:`score` answers the jobs when they are back.

        At most ``--max-batch`` classification rows are in flight: past that, this waits for
        answers (answering them) before sending more, so that requests keep waiting in the queue,
        where ``--max-queue`` (HTTP 429) and the deadlines hold as on the in-process engine."""
        jobs = [j for j in jobs if not j.done]
        self.metrics.batch_rows.labels("classify").observe(sum(len(j.rows) for j in jobs))
        for job in jobs:
            while self._scoring and self._in_flight() + len(job.rows) > self.config.max_batch:
                self.score()  # waits up to POLL_S; ended jobs leave _scoring, so this ends
            if not job.done:
                self._scoring[job] = [self._submit(self._row_scores, r) for r in job.rows]

    def _in_flight(self) -> int:
        """Classification rows sent and not answered yet."""
        return sum(not f.done() for futs in self._scoring.values() for f in futs)

    def _row_scores(self, row: Row) -> torch.Tensor:
        """Summed log-probability of each of the row's labels, (C,) (on a server thread)."""
        return self.client.label_scores(_rows(row), [row.source_ids], row.label_ids)[0]

    def score(self) -> None:
        """Answer the classifications whose rows are all back; forget ended ones."""
        self._wait()
        for job, futs in list(self._scoring.items()):
            if job.done:  # timed out or cancelled: what is in flight ends on its own
                for f in futs:
                    f.cancel()
                del self._scoring[job]
                continue
            if not all(f.done() for f in futs):
                continue
            del self._scoring[job]
            try:
                member = torch.stack([f.result() for f in futs])  # (k, C): one row per ensemble member
            except Exception as e:  # this job alone fails (e.g. the server refused its input)
                log.warning("a classification failed on vLLM: %r", e)
                job.fail(e)
                continue
            job.finish(ClassifyResult.of(job, member))

    # -- generation

    def admit(self, jobs: list[Job]) -> None:
        """Open one streamed completion per new generation row."""
        jobs = [j for j in jobs if not j.done]
        for job in jobs:
            req: GenerateRequest = job.request
            s = _Stream(job, TextStepper.for_tokenizer(self.tokenizer, req.max_new_tokens, req.stop))
            self._gen.append(s)
            self._submit(self._read, s)
        self.metrics.batch_rows.labels("generate").observe(len(self._gen))

    def _params(self, req: GenerateRequest) -> dict:
        params: dict = {"max_tokens": req.max_new_tokens, "temperature": req.temperature, "top_p": req.top_p}
        if req.temperature > 0 and req.seed is not None:
            params["seed"] = req.seed
        if req.stop:
            params["stop"] = list(req.stop)  # the server stops early; step() cuts the text as ours does
        return params

    def _read(self, s: _Stream) -> None:
        """Collect the row's token ids as the server streams them (on a server thread)."""
        row, req = s.job.rows[0], s.job.request
        rows = _rows(row)
        with self._open_lock:
            self.open_streams += 1
        try:
            if rows is None:  # bare model: plain token ids, what a request without a prompt costs
                chunks = self.client.stream(None, row.source_ids, **self._params(req))
            else:
                chunks = self.client.stream(request_embeds(rows, self.client.table, row.source_ids), **self._params(req))
            with closing(chunks):
                for c in chunks:
                    if s.job.done:  # cancelled or timed out: closing the stream aborts it on the server
                        return
                    if "token_ids" not in c:
                        raise VLLMError("this vLLM streams no token_ids (return_token_ids): upgrade it "
                                        "(tested with 0.32.0)")
                    with s.lock:
                        s.arrived.extend(int(t) for t in c.get("token_ids") or [])
                        if c.get("finish_reason"):
                            s.ended = str(c["finish_reason"])
                    self._news.set()
            with s.lock:
                s.ended = s.ended or "stop"
        except BaseException as e:
            with s.lock:
                s.error = e
        finally:
            with self._open_lock:
                self.open_streams -= 1

    def step(self) -> None:
        """Advance every generation row by the tokens that arrived; finished rows answer their jobs."""
        self._wait()
        now = time.monotonic()
        keep = []
        for s in self._gen:
            job = s.job
            if job.done:  # cancelled (client gone), timed out or failed: its reader stops
                continue
            if now > job.deadline:
                job.fail(RequestTimeoutError(f"generation took more than --request-timeout {self.config.request_timeout} s"))
                continue
            with s.lock:
                new, s.arrived = s.arrived, []
                ended, error = s.ended, s.error
            if self._advance(s, new):
                continue
            if error is not None:
                job.fail(error)
            elif ended is not None:  # the server stopped first: a stop token of its own, or max_tokens
                self._end(s, "length" if ended == "length" else "eos")
            else:
                keep.append(s)
        self._gen = keep

    def _advance(self, s: _Stream, tokens: list[int]) -> bool:
        """Take new tokens one by one, as TransformersSteps._step does; True if the row ended."""
        for t in tokens:
            reason = s.text.push(t)
            if reason != "eos":
                self.metrics.tokens.inc()
            if reason:
                self._end(s, reason)
                return True
        if piece := s.text.delta():
            s.job.emit(piece)
        return False

    def _end(self, s: _Stream, reason: FinishReason) -> None:
        text = s.text
        text.end(reason)
        if piece := text.delta():
            s.job.emit(piece)
        req: GenerateRequest = s.job.request
        s.job.finish(GenerateResult(text.final, list(text.out), text.reason, req.prompt))

