"""The scheduler: the queue, the deadlines and the worker loop that decides what the model runs
next (LitServe's ``batch``). Two threads: the worker (owns the model steps) and the reaper (fails
jobs at their deadline).

The first request of an idle engine waits at most ``max_wait_ms`` for others to share its batch.
Deadlines are enforced by the reaper: a request past ``request_timeout`` fails at once, leaves the
queue (its slot freed) and is dropped from a running batch at the next step; so is a cancelled one
(client gone). Each job ends in exactly one outcome, counted once (``softprompt_requests_total``).
A step that raises fails the jobs it held, never the server.

Not here: what a step does on the model (steps.py), turning requests into jobs (admission.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Sequence

from .batching import select_jobs
from .config import EngineConfig
from .errors import EngineStoppedError, QueueFullError, RequestTimeoutError
from .jobs import Job, Row
from .limits import check_batch_size
from .metrics import Metrics
from .steps import ModelSteps
from ..tasks import TASKS

log = logging.getLogger("softprompt.serve.engine")


class Scheduler:
    """Queue jobs and run them through ``steps`` on a worker thread, batched. ``prefill`` (the
    bank's ``fill``) computes the rows' missing prompt prefixes before a step reads them."""

    def __init__(self, config: EngineConfig, metrics: Metrics, steps: ModelSteps,
                 prefill: Callable[[Sequence[Row]], None] | None = None):
        self.config = config
        self.metrics = metrics
        self.steps = steps
        self.prefill = prefill
        self._queue: deque[Job] = deque()
        self._live: set[Job] = set()  # queued or running, not ended: the reaper's watch list
        self._cond = threading.Condition()  # re-entrant: a job ended under it may leave the queue
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
            self._reaper = threading.Thread(target=self._reap, name="softprompt-deadlines", daemon=True)
            self._thread.start()
            self._reaper.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads; queued and running jobs fail with :class:`EngineStoppedError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in (self._thread, self._reaper):
            if t is not None:
                t.join(timeout)
        self._thread = self._reaper = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- the queue (any thread)

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
        steps = self.steps
        try:
            while True:
                free = self.config.max_batch - len(steps.generating_jobs)
                jobs = self._take(block=not steps.generating_jobs and not steps.scoring_jobs, free_generate=free)
                if jobs is None:
                    break
                for kind in TASKS.values():  # classify: score in one pass; generate: admit, then one step
                    hooks = kind.serving
                    mine = [j for j in jobs if j.kind == kind.name]
                    if mine:
                        self._each(self._filled(hooks.start(steps)), mine)
                    if hooks.running(steps):
                        self._guard(hooks.running(steps), hooks.advance(steps))
                self.metrics.generation_rows.set(len(steps.generating_jobs))
        finally:
            with self._cond:
                left = list(self._queue)
                self._queue.clear()
                self.metrics.queue_depth.set(0)
            for job in left + steps.abort():
                job.fail(EngineStoppedError("the server is shutting down"))

    def _filled(self, start):
        """``start`` preceded by the prefill of the jobs' missing prompt prefixes (one batched
        pass for all of them; if it fails, ``_each`` retries job by job, so a failure stays with
        the job whose prompt caused it)."""
        if self.prefill is None:
            return start

        def run(jobs: list[Job]) -> None:
            self.prefill([r for j in jobs if not j.done for r in j.rows])
            start(jobs)

        return run

    def _each(self, start, jobs: list[Job]) -> None:
        """``start(jobs)`` (``steps.classify`` or ``steps.admit``) in one pass; if the pass fails,
        each job alone, so that one request's failure never fails the others it was batched with."""
        try:
            start(jobs)
        except Exception as e:
            if len(jobs) == 1:
                log.exception("a %s job failed", jobs[0].kind)
                jobs[0].fail(e)
                return
            log.warning("a batch of %d %s jobs failed (%r); running them one by one", len(jobs), jobs[0].kind, e)
            for job in jobs:
                self._each(start, [job])

    def _guard(self, jobs: Sequence[Job], fn, *args):
        """Run one batch step; if it raises, fail its jobs (not the server) and return None."""
        try:
            return fn(*args)
        except Exception as e:  # a bug or an out-of-memory: the batch fails, the engine goes on
            log.exception("batch of %d %s jobs failed", len(jobs), jobs[0].kind if jobs else "?")
            for job in jobs:
                job.fail(e)
            return None
