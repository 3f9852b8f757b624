"""The serving engine: one frozen base model, many prompts, mixed-task dynamic batching.

One worker thread owns the model. Requests (for any prompt, of any task) are validated and
tokenized in the caller's thread, queued, and batched by the worker:

- classification: queued jobs are grouped into one forward pass over each row's cached prompt
  prefix + its source (``_prefill``), then each distinct label set is scored once over its rows by
  ``scoring.label_logprobs`` (the same function training and evaluation use);
- generation: new rows are prefilled the same way and join the running batch (continuous
  batching, rows left-padded with masked columns); each step samples with ``scoring.sample_next``,
  and rows that finish (EOS, stop string, length, timeout, cancel) leave the batch.

The first request of an idle engine waits at most ``max_wait_ms`` for others to share its batch.
Every request's cost is bounded before it is queued (limits.py). Deadlines are enforced by a
reaper thread: a request past ``request_timeout`` fails at once, leaves the queue (its slot freed)
and is dropped from a running batch at the next step; so is a cancelled one (client gone). Each job
ends in exactly one outcome, counted once (``softprompt_requests_total``).
Not here: HTTP (app.py); requests, results and jobs (jobs.py); the layout arithmetic
(batching.py) and the limits (limits.py), both pure.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..base import BaseModel
from ..data import TaskSpec
from ..errors import DataError, ModelLoadError
from ..hf_compat import attn_implementation, layer_kinds, position_window, sliding_window
from ..model import PromptedModel, cache_layers, make_cache
from ..prefix import Prefix, PrefixKV, prefill, stack_prefixes
from ..scoring import SourceState, find_stop, label_logprobs, pad_id, sample_next
from .bank import PromptBank, PromptEntry
from .batching import (
    KV, concat_rows, ensemble_probs, group_indices, label_chunks, select_jobs, select_rows,
    stream_safe_length, task_cost, trim_left,
)
from .config import EngineConfig
from .errors import (
    EngineStoppedError, InputTooLongError, InvalidRequestError, QueueFullError, RequestTimeoutError, WrongTaskError,
)
from .jobs import (  # noqa: F401  (re-exported: the engine's public API)
    ClassifyRequest, ClassifyResult, GenerateRequest, GenerateResult, Job, Listener, Result, Row,
)
from .limits import (
    CHARS_PER_TOKEN_LIMIT, MIN_TEMPERATURE, check_batch_size, check_label_ids, check_label_names, check_scoring,
    check_seed, check_stop, check_unicode, classify_cost, scoring_tokens,
)
from .metrics import Metrics

log = logging.getLogger(__name__)

BARE_GENERATE = TaskSpec("generate", template="{input}", max_length=1 << 30)
"""Bare-model generation: the text is the whole input (no template)."""


@dataclass
class _ScoreTask:
    """Some labels of one label set, scored over the rows that share it."""

    label_ids: tuple[tuple[int, ...], ...]
    rows: list[int]  # row indices in the classification's state
    start: int  # index of the first of these labels in the label set
    jobs: list[Job]  # the jobs those rows belong to


@dataclass
class _Scoring:
    """A classification pass in progress: sources read, labels scored over one or more steps."""

    state: SourceState  # every row of the pass
    tasks: deque  # of _ScoreTask, in the order they run
    scores: list[torch.Tensor]  # per row (C_row,), filled as tasks complete
    pending: dict[Job, int]  # tasks left per job; answered at 0
    first: dict[Job, int]  # index of each job's first row


@dataclass
class _GenRow:
    job: Job
    generator: torch.Generator | None
    temperature: float
    top_p: float
    max_new: int
    stops: list[str]
    out: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""


@dataclass
class _GenBatch:
    """The running generation batch: one cache over all rows."""

    rows: list[_GenRow]
    layers: list[KV]  # per layer (B, H, L, hd)
    mask: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (B,) position id of each row's next token
    logits: torch.Tensor  # (B, V) next-token logits


# ----------------------------------------------------------------------------- engine


def check_servable(config) -> None:
    """Refuse models whose caches the prefix batching cannot lay out (quirks fenced here).

    Full attention and sliding-window attention (masked by position, see ``position_masks``) are
    served; linear-attention / state-space layers keep no per-token keys to share and are refused.
    """
    kinds = set(layer_kinds(config) or ["full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(
            f"the serving engine supports full- and sliding-window-attention decoders only; this model has "
            f"{sorted(kinds)} layers"
        )
    if sliding_window(config) is not None and position_window(config) is None:
        raise ModelLoadError(
            f"serving a sliding-window model needs eager or sdpa attention (the model was loaded with "
            f"{attn_implementation(config)!r}): the window is applied by position in the mask"
        )


class Engine:
    """Serve many prompts on one frozen base model, in-process.

    Args:
        base: the frozen base model.
        config: batching and limits.
        prompts_dir: folder of prompt files; load them with ``engine.bank.load_all()``.
        strict: refuse prompts trained on another copy of the model (see ``check_compatible``).
        metrics: where to count (default: a fresh registry).

    Use as a context manager (or ``start()`` / ``stop()``); ``classify``, ``generate`` and
    ``stream`` block, ``submit`` returns a :class:`Job`.
    """

    def __init__(self, base: BaseModel, config: EngineConfig | None = None, *, prompts_dir=None,
                 strict: bool = True, metrics: Metrics | None = None):
        self.config = config or EngineConfig()
        check_servable(base.model.config)
        self.pm = PromptedModel(base)
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.model_lock = threading.Lock()
        self.bank = PromptBank(self.pm, prompts_dir, strict=strict, max_spec_length=1 << 30,
                               model_lock=self.model_lock, limits=self.config)
        self.metrics = metrics or Metrics()
        self.metrics.prompts.set_function(lambda: len(self.bank))
        self._queue: deque[Job] = deque()
        self._live: set[Job] = set()  # queued or running, not ended: the reaper's watch list
        self._cond = threading.Condition()  # re-entrant: a job ended under it may leave the queue
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._scoring: list[_Scoring] = []  # classifications whose labels are being scored (worker only)
        self._pad = pad_id(self.pm)
        self._eos = self.tokenizer.eos_token_id
        self._bare_specs: dict[tuple, TaskSpec] = {}

    # -- lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
            self._reaper = threading.Thread(target=self._reap, name="softprompt-deadlines", daemon=True)
            self._thread.start()
            self._reaper.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued and running requests fail with :class:`EngineStoppedError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in (self._thread, self._reaper):
            if t is not None:
                t.join(timeout)
        self._thread = self._reaper = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- blocking conveniences

    def classify(self, text: str, prompt: str | Sequence[str] | None = None, *, labels: list[str] | None = None,
                 template: str | None = None) -> ClassifyResult:
        """Classify ``text`` with a prompt, an ensemble (list of names), or the bare model (None + labels)."""
        names = [] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        return self.submit(ClassifyRequest(text, names, labels, template)).result()

    def generate(self, text: str, prompt: str | None = None, **sampling) -> GenerateResult:
        """Generate a continuation; ``sampling`` holds :class:`GenerateRequest` fields."""
        return self.submit(GenerateRequest(text, prompt, **sampling)).result()

    def stream(self, text: str, prompt: str | None = None, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (their concatenation is the final text)."""
        import queue

        events: queue.Queue = queue.Queue()
        job = self.submit(GenerateRequest(text, prompt, **sampling), listener=lambda k, p: events.put((k, p)))
        try:
            while True:
                kind, payload = events.get()  # the engine ends every job by its deadline
                if kind == "token":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            if not job.done:  # the caller stopped reading: free the row
                job.cancel()

    # -- submission

    def submit(self, request: ClassifyRequest | GenerateRequest, listener: Listener | None = None) -> Job:
        """Validate, tokenize and queue a request; raises :class:`RequestError` subclasses."""
        job = self.prepare(request, listener)
        self.enqueue([job])
        return job

    def prepare(self, request: ClassifyRequest | GenerateRequest, listener: Listener | None = None) -> Job:
        """Validate, bound and tokenize a request into a :class:`Job` (not queued yet)."""
        if isinstance(request, ClassifyRequest):
            return self._prepare_classify(request, listener)
        if isinstance(request, GenerateRequest):
            return self._prepare_generate(request, listener)
        raise TypeError(f"not a request: {type(request).__name__}")

    def enqueue(self, jobs: Sequence[Job]) -> None:
        """Queue jobs, all or none; raises :class:`QueueFullError` when they do not fit now, and
        :class:`RequestTooLargeError` when they never could (more than ``--max-queue``)."""
        if len(jobs) > 1:
            check_batch_size(len(jobs), self.config)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStoppedError("the engine is not running")
            if len(self._queue) + len(jobs) > self.config.max_queue:
                for job in jobs:
                    self.metrics.requests.labels(job.kind, "queue_full").inc()
                raise QueueFullError(
                    f"the queue is full ({len(self._queue)} waiting, --max-queue {self.config.max_queue}); retry later"
                )
            now = time.monotonic()
            for job in jobs:
                job.submitted = now
                job.deadline = now + self.config.request_timeout
                job.on_outcome = self._ended
                self._queue.append(job)
                self._live.add(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()

    def _ended(self, job: Job, outcome: str) -> None:
        """A job ended (any thread): count it once, free its queue slot at once."""
        self.metrics.requests.labels(job.kind, outcome).inc()
        if outcome == "ok":
            self.metrics.latency.labels(job.kind).observe(time.monotonic() - job.submitted)
        with self._cond:
            self._live.discard(job)
            if job.started is None:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                self.metrics.queue_depth.set(len(self._queue))

    def _text(self, text, what: str = "text") -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"the input {what} is empty" if what == "text" else f"{what} is empty")
        limit = self.config.max_input_tokens
        if len(text) > CHARS_PER_TOKEN_LIMIT * limit:
            raise InputTooLongError(f"the {what} has {len(text)} characters, too long for --max-input-tokens {limit}")
        return check_unicode(text, what)

    def _source_ids(self, spec: TaskSpec, text: str) -> list[int]:
        self._text(text)
        limit = self.config.max_input_tokens
        ids = spec.source_ids(self.tokenizer, text)
        if len(ids) > limit:
            raise InputTooLongError(f"the input is {len(ids)} tokens with its template, more than --max-input-tokens {limit}")
        return ids

    def _entry(self, name: str, kind: str) -> PromptEntry:
        entry = self.bank.get(name)
        if entry.spec.kind != kind:
            raise WrongTaskError(f"prompt {name!r} is a {entry.spec.kind} prompt, not a {kind} prompt")
        return entry

    def _bare_spec(self, labels, template) -> TaskSpec:
        if not isinstance(labels, (list, tuple)):
            raise InvalidRequestError("labels must be a list of strings")
        check_label_names(labels, self.config)  # before tokenizing any of them
        if template is not None:
            if not isinstance(template, str):
                raise InvalidRequestError("template must be a string")
            self._text(template, "template")  # its tokens count against --max-input-tokens with the text
        key = (tuple(labels), template)
        if key not in self._bare_specs:
            try:
                spec = TaskSpec("classify", template=template, labels=list(labels), max_length=1 << 30)
                check_label_ids(spec.label_ids(self.tokenizer), self.config)
            except DataError as e:
                raise InvalidRequestError(f"bare-model classification: {e}") from None
            if len(self._bare_specs) > 1024:
                self._bare_specs.clear()
            self._bare_specs[key] = spec
        return self._bare_specs[key]

    def _prepare_classify(self, req: ClassifyRequest, listener) -> Job:
        names = list(req.prompts)
        if len(names) > self.config.max_ensemble:
            raise InvalidRequestError(f"{len(names)} prompts in one request; --max-ensemble is {self.config.max_ensemble}")
        if not names:
            if not req.labels:
                raise InvalidRequestError("name a prompt, or give labels to classify with the bare model")
            spec = self._bare_spec(req.labels, req.template)
            lab = tuple(tuple(x) for x in spec.label_ids(self.tokenizer))
            pairs = [(PrefixKV.empty(), spec, lab)]
            labels = list(spec.labels)
        else:
            if req.labels is not None or req.template is not None:
                raise InvalidRequestError("labels and template come from the prompt file; give them only for the bare model")
            entries = [self._entry(n, "classify") for n in names]
            labels = entries[0].spec.labels
            for e in entries[1:]:
                if e.spec.labels != labels:
                    raise InvalidRequestError(
                        f"an ensemble needs prompts with the same labels: {entries[0].name!r} has {labels}, "
                        f"{e.name!r} has {e.spec.labels}"
                    )
            pairs = [(e.prefix, e.spec, e.label_ids) for e in entries]
            labels = list(labels)
        rows = [Row(prefix, self._source_ids(spec, req.text), lab) for prefix, spec, lab in pairs]
        lens = [[len(x) for x in r.label_ids] for r in rows]
        check_scoring(sum(scoring_tokens(r.prefix.length, len(r.source_ids), n) for r, n in zip(rows, lens)), self.config)
        cost = sum(classify_cost(len(r.source_ids), n) for r, n in zip(rows, lens))
        return Job("classify", req, rows, labels, listener, cost=cost)

    def _prepare_generate(self, req: GenerateRequest, listener) -> Job:
        cap = self.config.max_new_tokens
        if req.max_new_tokens is None:
            req.max_new_tokens = self.config.default_new_tokens
        if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int) or not 1 <= req.max_new_tokens <= cap:
            raise InvalidRequestError(f"max_new_tokens must be between 1 and {cap} (--max-new-tokens), got {req.max_new_tokens}")
        if not 0 <= req.temperature <= 100:
            raise InvalidRequestError(f"temperature must be between 0 and 100, got {req.temperature}")
        if req.temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow; greedy is the limit anyway
            req.temperature = 0.0
        if not 0 < req.top_p <= 1:
            raise InvalidRequestError(f"top_p must be more than 0 and at most 1, got {req.top_p}")
        check_seed(req.seed)
        check_stop(req.stop, self.config)
        if req.prompt is None:
            prefix, spec = PrefixKV.empty(), BARE_GENERATE
        else:
            entry = self._entry(req.prompt, "generate")
            prefix, spec = entry.prefix, entry.spec
        job = Job("generate", req, [Row(prefix, self._source_ids(spec, req.text))], None, listener)
        if req.temperature > 0:  # seeded here, so a bad seed fails this request alone, before it is queued
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            job.generator = torch.Generator().manual_seed(seed)
        return job

    # -- deadlines (reaper thread)

    def _reap(self) -> None:
        """Fail every queued or running job at its deadline: a queued one leaves the queue at once
        (its slot freed), a running one is dropped by the worker at its next step."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                expired = [j for j in self._live if j.deadline <= now]
                if not expired:
                    nxt = min((j.deadline for j in self._live), default=now + 3600)
                    self._cond.wait(max(0.001, nxt - now))
                    continue
            for job in expired:
                where = "waited" if job.started is None else "took"
                job.fail(RequestTimeoutError(f"the request {where} more than --request-timeout {self.config.request_timeout} s"))

    # -- worker

    def _take(self, block: bool, free_generate: int) -> list[Job] | None:
        """Jobs for the next step (None when stopping). Blocks while idle; once a job is queued,
        waits up to ``max_wait_ms`` (from its arrival) for more to fill the batch."""
        with self._cond:
            if block:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                wait_until = self._queue[0].submitted + self.config.max_wait_ms / 1000 if self._queue else 0
                while not self._stopping:
                    rows = sum(len(j.rows) for j in self._queue)
                    cost = sum(j.cost for j in self._queue)
                    left = wait_until - time.monotonic()
                    if rows >= self.config.max_batch or cost >= self.config.max_batch_tokens or left <= 0:
                        break
                    self._cond.wait(left)
            if self._stopping:
                return None
            live = [j for j in self._queue if not j.done]  # ended jobs leave the queue in _ended already
            idx = select_jobs([j.kind for j in live], [len(j.rows) for j in live], [j.cost for j in live],
                              self.config.max_batch, free_generate, self.config.max_batch_tokens)
            taken = [live[i] for i in idx]
            chosen = set(idx)
            self._queue = deque(j for i, j in enumerate(live) if i not in chosen)
            self.metrics.queue_depth.set(len(self._queue))
            now = time.monotonic()
            for job in taken:
                job.started = now
        for job in taken:
            self.metrics.queue_wait.labels(job.kind).observe(now - job.submitted)
        return taken

    def _run(self) -> None:
        gen: _GenBatch | None = None
        try:
            while True:
                free = self.config.max_batch - (len(gen.rows) if gen else 0)
                jobs = self._take(block=gen is None and not self._scoring, free_generate=free)
                if jobs is None:
                    break
                classify = [j for j in jobs if j.kind == "classify"]
                generate = [j for j in jobs if j.kind == "generate"]
                if classify:
                    self._classify_each(classify)
                if self._scoring:
                    self._guard([j for sc in self._scoring for j in sc.pending], self._score_step)
                if generate:
                    gen = self._admit_each(gen, generate)
                if gen is not None:
                    gen = self._guard([r.job for r in gen.rows], self._step, gen)
                self.metrics.generation_rows.set(len(gen.rows) if gen else 0)
        finally:
            with self._cond:
                left = list(self._queue)
                self._queue.clear()
                self.metrics.queue_depth.set(0)
            running = [r.job for r in gen.rows] if gen else []
            for job in left + running + [j for sc in self._scoring for j in sc.pending]:
                job.fail(EngineStoppedError("the server is shutting down"))
            self._scoring.clear()

    def _classify_each(self, jobs: list[Job]) -> None:
        """Classify ``jobs`` in one pass; if the pass fails, each job alone, so that one request's
        failure never fails the others it was batched with."""
        try:
            self._classify(jobs)
        except Exception as e:
            if len(jobs) == 1:
                log.exception("a classify job failed")
                jobs[0].fail(e)
                return
            log.warning("a batch of %d classify jobs failed (%r); running them one by one", len(jobs), e)
            for job in jobs:
                self._classify_each([job])

    def _admit_each(self, gen: "_GenBatch | None", jobs: list[Job]) -> "_GenBatch | None":
        """Join ``jobs`` to the running batch; if that fails, each job alone (as ``_classify_each``)."""
        try:
            return self._admit(gen, jobs)
        except Exception as e:
            if len(jobs) == 1:
                log.exception("a generate job failed")
                jobs[0].fail(e)
                return gen
            log.warning("admitting %d generate jobs failed (%r); admitting them one by one", len(jobs), e)
            for job in jobs:
                gen = self._admit_each(gen, [job])
            return gen

    def _guard(self, jobs: Sequence[Job], fn, *args):
        """Run one batch step; if it raises, fail its jobs (not the server) and return None."""
        try:
            return fn(*args)
        except Exception as e:  # a bug or an out-of-memory: the batch fails, the engine goes on
            log.exception("batch of %d %s jobs failed", len(jobs), jobs[0].kind if jobs else "?")
            for job in jobs:
                job.fail(e)
            return None

    def _finish(self, job: Job, result: Result) -> None:
        job.finish(result)  # a no-op if the job already ended (timed out or cancelled meanwhile)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.fail(error)

    # -- model steps (worker thread only)

    def _prefill(self, rows: Sequence[Row]) -> SourceState:
        """Read each row's source after its cached prefix: one forward pass over the sources only."""
        layers, pmask = stack_prefixes([r.prefix for r in rows])  # (B, H, Pmax, hd), (B, Pmax)
        return prefill(self.pm, Prefix(layers, pmask), [r.source_ids for r in rows])  # the training pass's reader

    @torch.no_grad()
    def _classify(self, jobs: list[Job]) -> None:
        """Read the jobs' sources in one pass and plan their label scoring: tasks of at most
        ``--max-step-label-tokens`` label tokens, cheapest label sets first, run by ``_score_step``
        between other work."""
        jobs = [j for j in jobs if not j.done]  # timed out or cancelled since they were taken
        if not jobs:
            return
        rows = [r for j in jobs for r in j.rows]
        self.metrics.batch_rows.labels("classify").observe(len(rows))
        with self.model_lock:
            state = self._prefill(rows)
        owner = [j for j in jobs for _ in j.rows]  # row -> its job
        groups = group_indices([r.label_ids for r in rows])
        groups.sort(key=lambda g: task_cost(len(g[1]), g[0]))  # light label sets are answered first
        tasks: deque[_ScoreTask] = deque()
        pending = {job: 0 for job in jobs}
        for label_ids, idx in groups:
            for start, chunk in label_chunks(label_ids, len(idx), self.config.max_step_label_tokens):
                task = _ScoreTask(chunk, idx, start, list(dict.fromkeys(owner[i] for i in idx)))
                tasks.append(task)
                for job in task.jobs:
                    pending[job] += 1
        first = dict(zip(jobs, [0] + list(itertools.accumulate(len(j.rows) for j in jobs))))
        self._scoring.append(_Scoring(state, tasks, [torch.zeros(len(r.label_ids)) for r in rows], pending, first))

    @torch.no_grad()
    def _score_step(self) -> None:
        """One step of every pending classification: each scores up to ``--max-step-label-tokens``
        label tokens, so a classification with many long labels advances a chunk at a time while
        the requests that arrive meanwhile are answered in between. A job is answered as soon as
        its rows are scored; one whose task fails fails alone; tasks of ended jobs are skipped."""
        budget = self.config.max_step_label_tokens
        for sc in list(self._scoring):
            spent = 0
            while sc.tasks:
                task = sc.tasks[0]
                cost = task_cost(len(task.rows), task.label_ids)
                if spent and spent + cost > budget:
                    break
                sc.tasks.popleft()
                if all(j.done for j in task.jobs):  # timed out or cancelled: skip the work
                    continue
                spent += cost
                try:
                    with self.model_lock:
                        sub = sc.state if len(task.rows) == len(sc.scores) else sc.state.select(task.rows)
                        s = label_logprobs(self.pm, sub, task.label_ids).float().cpu()  # (b, c)
                except Exception as e:  # e.g. a label token the model does not have
                    log.exception("scoring %d labels of %d rows failed", len(task.label_ids), len(task.rows))
                    for job in task.jobs:
                        job.fail(e)
                    continue
                for j, i in enumerate(task.rows):
                    sc.scores[i][task.start : task.start + len(task.label_ids)] = s[j]
                for job in task.jobs:
                    sc.pending[job] -= 1
                    if sc.pending[job] == 0:
                        self._answer(job, sc.scores[sc.first[job] : sc.first[job] + len(job.rows)])
            if not sc.tasks:
                self._scoring.remove(sc)

    def _answer(self, job: Job, scores: list[torch.Tensor]) -> None:
        member = torch.stack(scores)  # (k, C)
        probs = ensemble_probs(member)  # (C,)
        self._finish(job, ClassifyResult(
            label=job.labels[int(probs.argmax())],
            probs={l: float(p) for l, p in zip(job.labels, probs)},
            scores=member.tolist(),
            prompts=list(job.request.prompts),
        ))

    @torch.no_grad()
    def _admit(self, gen: _GenBatch | None, jobs: list[Job]) -> _GenBatch:
        """Prefill new generation rows and join them to the running batch."""
        jobs = [j for j in jobs if not j.done]  # timed out or cancelled since they were taken
        if not jobs:
            return gen
        rows = [j.rows[0] for j in jobs]
        with self.model_lock:
            state = self._prefill(rows)
            logits = self.pm.project(state.last_hidden)  # (b, V)
        new_rows = []
        for job in jobs:
            req: GenerateRequest = job.request
            new_rows.append(_GenRow(job, job.generator, req.temperature, req.top_p, req.max_new_tokens, list(req.stop)))
        layers = cache_layers(state.cache)
        if gen is None:
            return _GenBatch(new_rows, layers, state.mask, state.next_pos, logits)
        layers, mask = concat_rows((gen.layers, gen.mask), (layers, state.mask))
        return _GenBatch(gen.rows + new_rows, layers, mask, torch.cat([gen.pos, state.next_pos]),
                         torch.cat([gen.logits, logits]))

    @torch.no_grad()
    def _step(self, gen: _GenBatch) -> _GenBatch | None:
        """Sample one token per row, retire finished rows, run the rest one step."""
        rows = gen.rows
        self.metrics.batch_rows.labels("generate").observe(len(rows))
        nxt, errors = self._sample(gen)  # (B,)
        now = time.monotonic()
        keep = []
        for i, row in enumerate(rows):
            job = row.job
            if i in errors:
                job.fail(errors[i])
            if job.done:  # cancelled by its caller (client gone), timed out or failed: dropped at this step
                continue
            if now > job.deadline:
                self._fail(job, RequestTimeoutError(f"generation took more than --request-timeout {self.config.request_timeout} s"))
                continue
            t = int(nxt[i])
            if t == self._eos:
                self._end(row, "eos")
                continue
            row.out.append(t)
            self.metrics.tokens.inc()
            row.text = self.tokenizer.decode(row.out, skip_special_tokens=True)
            if row.stops and find_stop(row.text, row.stops) >= 0:
                self._end(row, "stop")
                continue
            if len(row.out) >= row.max_new:
                self._end(row, "length")
                continue
            visible = row.text.lstrip()
            safe = visible[: stream_safe_length(visible, row.stops)]
            if len(safe) > len(row.emitted) and safe.startswith(row.emitted):
                job.emit(safe[len(row.emitted):])
                row.emitted = safe
            keep.append(i)
        if not keep:
            return None
        layers, mask, pos = gen.layers, gen.mask, gen.pos
        if len(keep) < len(rows):
            layers, mask = trim_left(*select_rows(layers, mask, keep))
            pos, nxt = pos[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], 1)  # (B', L + 1)
        with self.model_lock:
            hidden, cache = self.pm.decode(self.pm.embed(nxt[:, None].to(self.device)), mask, pos[:, None],
                                           past_key_values=make_cache(layers), use_cache=True)
            logits = self.pm.project(hidden[:, -1])  # (B', V)
        return _GenBatch([rows[i] for i in keep], cache_layers(cache), mask, pos + 1, logits)

    def _sample(self, gen: _GenBatch) -> tuple[torch.Tensor, dict[int, Exception]]:
        """The next token of each row (B,), greedy rows at once and sampled rows one by one, so
        that a row whose sampling fails fails alone (and each row's generator advances exactly as
        ``sample_next`` over the whole batch would advance it)."""
        out = gen.logits.argmax(-1)  # (B,)
        errors: dict[int, Exception] = {}
        for i, r in enumerate(gen.rows):
            if r.temperature > 0 and not r.job.done:
                try:
                    out[i] = sample_next(gen.logits[i : i + 1], [r.temperature], [r.top_p], [r.generator])[0]
                except Exception as e:  # e.g. non-finite probabilities
                    log.warning("sampling a row failed: %r", e)
                    errors[i] = e
        return out, errors

    def _end(self, row: _GenRow, reason: str) -> None:
        text = row.text
        cut = find_stop(text, row.stops) if row.stops else -1
        final = (text[:cut] if cut >= 0 else text).strip()
        if final.startswith(row.emitted):
            row.job.emit(final[len(row.emitted):])
        req: GenerateRequest = row.job.request
        self._finish(row.job, GenerateResult(final, list(row.out), reason, req.prompt))


def create_engine(config, base: BaseModel | None = None) -> Engine:
    """Load the base model named by a :class:`~softprompt.serve.config.ServeConfig` (unless given),
    build the engine and load every prompt of ``config.prompts_dir``. Not started."""
    from ..base import load_base_model
    from ..precision import fast_weight_dtype

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if base is None:
        base = load_base_model(config.model, dtype=fast_weight_dtype(config.dtype, config.device), device=config.device)
    engine = Engine(base, config.engine, prompts_dir=config.prompts_dir, strict=not config.allow_other_base)
    engine.bank.load_all()
    return engine
