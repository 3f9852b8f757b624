"""Model steps: what the worker thread runs on the model (LitServe's ``predict``), behind a small
interface (:class:`ModelSteps`) so that another backend can take the model's place.

:class:`TransformersSteps` runs the frozen HF model in-process:

- classification: the jobs' rows are read in one forward pass over each row's cached prompt prefix
  + its source (``prefix.prefill``, the same reader training uses), then each distinct label set is
  scored over its rows by ``scoring.label_logprobs``, a bounded chunk of label tokens per step;
- generation: new rows are prefilled the same way and join the running batch (continuous
  batching, rows left-padded with masked columns); each step samples with ``scoring.sample_next``,
  and rows that finish (EOS, stop string, length, timeout, cancel) leave the batch.

Not here: the queue and when steps run (scheduler.py), the layout arithmetic (batching.py, prefix.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..errors import ModelLoadError
from ..hf_compat import attn_implementation, layer_kinds, position_window, sliding_window
from ..model import PromptedModel, cache_layers, make_cache
from ..prefix import Prefix, prefill, stack_prefixes
from ..scoring import SourceState, label_logprobs, sample_next
from ..textgen import TextStepper
from .batching import (
    KV, concat_rows, group_indices, label_chunks, select_rows, task_cost, trim_left,
)
from .config import EngineConfig
from .errors import RequestTimeoutError
from .jobs import ClassifyResult, GenerateRequest, GenerateResult, Job, Row
from .metrics import Metrics

log = logging.getLogger("softprompt.serve.engine")


class ModelSteps(Protocol):
    """What the scheduler asks of a model backend, on the worker thread only. Any call may raise:
    the scheduler then fails the jobs concerned (never the server) and goes on."""

    @property
    def scoring_jobs(self) -> list[Job]:
        """Jobs of the classifications in progress (their labels are being scored)."""
        ...

    @property
    def generating_jobs(self) -> list[Job]:
        """Jobs of the running generation batch, one row each."""
        ...

    def classify(self, jobs: list[Job]) -> None:
        """Read the jobs' sources; their labels are then scored by :meth:`score`."""
        ...

    def score(self) -> None:
        """One bounded step of every classification in progress; answers the jobs it completes."""
        ...

    def admit(self, jobs: list[Job]) -> None:
        """Join generation jobs to the running batch (left as it was if this raises)."""
        ...

    def step(self) -> None:
        """One token for every running generation row; finished rows answer their jobs (the
        running batch is dropped if this raises)."""
        ...

    def abort(self) -> list[Job]:
        """Forget all work in progress; returns the jobs it held (to be failed)."""
        ...


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
    text: TextStepper


@dataclass
class _GenBatch:
    """The running generation batch: one cache over all rows."""

    rows: list[_GenRow]
    layers: list[KV]  # per layer (B, H, L, hd)
    mask: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (B,) position id of each row's next token
    logits: torch.Tensor  # (B, V) next-token logits


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


class TransformersSteps:
    """:class:`ModelSteps` on an in-process HF model (a :class:`PromptedModel`); ``model_lock``
    serialises its forward passes with the prompt bank's prefix computations."""

    def __init__(self, pm: PromptedModel, config: EngineConfig, metrics: Metrics, model_lock: threading.Lock):
        self.pm = pm
        self.tokenizer = pm.base.tokenizer
        self.config = config
        self.metrics = metrics
        self.model_lock = model_lock
        self._scoring: list[_Scoring] = []  # classifications whose labels are being scored
        self._gen: _GenBatch | None = None  # the running generation batch

    # -- the ModelSteps interface

    @property
    def scoring_jobs(self) -> list[Job]:
        return [j for sc in self._scoring for j in sc.pending]

    @property
    def generating_jobs(self) -> list[Job]:
        return [r.job for r in self._gen.rows] if self._gen else []

    def admit(self, jobs: list[Job]) -> None:
        self._gen = self._admit(self._gen, jobs)  # unchanged if this raises

    def step(self) -> None:
        gen, self._gen = self._gen, None  # dropped if this raises
        self._gen = self._step(gen)

    def abort(self) -> list[Job]:
        jobs = self.generating_jobs + self.scoring_jobs
        self._gen = None
        self._scoring.clear()
        return jobs

    # -- on the model

    def _prefill(self, rows: Sequence[Row]) -> SourceState:
        """Read each row's source after its cached prefix: one forward pass over the sources only."""
        layers, pmask = stack_prefixes([r.prefix for r in rows])  # (B, H, Pmax, hd), (B, Pmax)
        return prefill(self.pm, Prefix(layers, pmask), [r.source_ids for r in rows])  # the training pass's reader

    @torch.no_grad()
    def classify(self, jobs: list[Job]) -> None:
        """Read the jobs' sources in one pass and plan their label scoring: tasks of at most
        ``--max-step-label-tokens`` label tokens, cheapest label sets first, run by :meth:`score`
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
    def score(self) -> None:
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
                        member = torch.stack(sc.scores[sc.first[job] : sc.first[job] + len(job.rows)])  # (k, C)
                        job.finish(ClassifyResult.of(job, member))
            if not sc.tasks:
                self._scoring.remove(sc)

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
            text = TextStepper.for_tokenizer(self.tokenizer, req.max_new_tokens, req.stop)
            new_rows.append(_GenRow(job, job.generator, req.temperature, req.top_p, text))
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
                job.fail(RequestTimeoutError(f"generation took more than --request-timeout {self.config.request_timeout} s"))
                continue
            reason = row.text.push(int(nxt[i]))
            if reason != "eos":
                self.metrics.tokens.inc()
            if piece := row.text.delta():
                job.emit(piece)
            if reason:
                self._end(row)
            else:
                keep.append(i)
        if not keep:
            return None
        layers, mask, pos = gen.layers, gen.mask, gen.pos
        if len(keep) < len(rows):
            layers, mask = trim_left(*select_rows(layers, mask, keep))
            pos, nxt = pos[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], 1)  # (B', L + 1)
        with self.model_lock:
            hidden, cache = self.pm.decode(self.pm.embed(nxt[:, None].to(self.pm.base.device)), mask, pos[:, None],
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

    def _end(self, row: _GenRow) -> None:
        text = row.text
        req: GenerateRequest = row.job.request
        row.job.finish(GenerateResult(text.final, list(text.out), text.reason, req.prompt))
