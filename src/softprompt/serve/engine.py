"""The serving engine: one frozen base model, many prompts, mixed-task dynamic batching.

The engine composes three parts along LitServe's seams:

- admission.py: a request is validated, bounded and tokenized in the caller's thread
  (``decode_request``); a request that fails there costs the model nothing;
- scheduler.py: the queue, the deadlines and the worker loop that batches jobs (``batch``);
- steps.py: what the worker runs on the model (``predict``), behind the :class:`ModelSteps`
  interface; :class:`TransformersSteps` runs the HF model in-process, ``vllm/steps.py`` sends
  the rows to a vLLM server. Which one is a :class:`~.backend.Backend`, picked by name from
  :data:`softprompt.backends.BACKENDS` (``softprompt serve --backend``).

Not here: HTTP (http/); requests, results and jobs (jobs.py); the layout arithmetic (batching.py,
prefix.py) and the limits (limits.py), all pure.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch

from ..base import BaseModel
from ..model import PromptedModel
from .admission import Admission
from ..backends import build_backend
from .backend import Backend, in_process
from .bank import PromptBank
from .config import EngineConfig
from .heap_trim import HeapTrimmer, libc_trim
from .jobs import (  # noqa: F401  (Job, Listener, Result, Row: the types the engine's API names)
    ClassifyRequest, ClassifyResult, GenerateRequest, GenerateResult, Job, Listener, Result, Row,
)
from .metrics import Metrics
from .scheduler import Scheduler
from .steps import ModelSteps


class Engine:
    """Serve many prompts on one frozen base model, in-process.

    Args:
        base: the frozen base model.
        config: batching and limits.
        prompts_dir: folder of prompt files; load them with ``engine.bank.load_all()``.
        strict: refuse prompts trained on another copy of the model (see ``check_compatible``).
        metrics: where to count (default: a fresh registry).
        backend: what runs the model (default: ``base`` in this process; then ``base`` may be None).
        durable_uploads: uploads are written to ``prompts_dir`` and deletions remove the file
            (``softprompt serve`` without ``--ephemeral-uploads``); default: uploads in memory only.

    Use as a context manager (or ``start()`` / ``stop()``); ``classify``, ``generate`` and
    ``stream`` block, ``submit`` returns a :class:`Job`.
    """

    def __init__(self, base: BaseModel | None, config: EngineConfig | None = None, *, prompts_dir=None,
                 strict: bool = True, metrics: Metrics | None = None, backend: Backend | None = None,
                 durable_uploads: bool = False):
        self.config = config or EngineConfig()
        self.backend = backend or in_process(base)
        self.pm: PromptedModel = self.backend.pm
        self.tokenizer = self.pm.base.tokenizer
        self.device = self.pm.base.device
        self.model_lock = threading.Lock()
        self.bank = PromptBank(self.pm, prompts_dir, strict=strict, max_spec_length=1 << 30,
                               model_lock=self.model_lock, limits=self.config, prefixer=self.backend.prefixer,
                               durable=durable_uploads)
        self.metrics = metrics or Metrics()
        self.metrics.prompts.set_function(lambda: len(self.bank))
        self.metrics.watch_store(self.bank.stats)
        self.admission = Admission(self.bank, self.tokenizer, self.config)
        self.steps: ModelSteps = self.backend.steps(self.config, self.metrics, self.model_lock)
        self.scheduler = Scheduler(self.config, self.metrics, self.steps, prefill=self.bank.fill)
        self.trimmer = HeapTrimmer(self._store_activity, libc_trim())

    # -- lifecycle

    def start(self) -> "Engine":
        self.scheduler.start()
        self.trimmer.start()
        return self

    def _store_activity(self) -> tuple:
        """Counters that move when the store frees memory (reads, evictions, prefills, uploads)."""
        s = self.bank.stats()
        return s.misses, s.evictions, s.prefills, s.load_seconds

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued and running requests fail with :class:`EngineStoppedError`;
        the backend lets go of what it holds (e.g. a vLLM server it launched)."""
        self.scheduler.stop(timeout)
        self.trimmer.stop()
        self.backend.close()
        self.bank.spill.close()  # its queued writes finished, a temporary folder removed

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.scheduler.running

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

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
        return self.admission.prepare(request, listener)

    def enqueue(self, jobs: Sequence[Job]) -> None:
        """Queue jobs, all or none; raises :class:`QueueFullError` when they do not fit now, and
        :class:`RequestTooLargeError` when they never could (more than ``--max-queue``)."""
        self.scheduler.enqueue(jobs)


def create_engine(config, base: BaseModel | None = None) -> Engine:
    """Build the backend named by a :class:`~softprompt.serve.config.ServeConfig` (``base``: an
    already loaded model for the in-process one), the engine on it, and index the prompts of
    ``config.prompts_dir`` (a few loaded now, the rest on first use). Not started."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    backend = build_backend(config, base)
    try:
        engine = Engine(None, config.engine, prompts_dir=config.prompts_dir, strict=not config.allow_other_base,
                        backend=backend, durable_uploads=not config.ephemeral_uploads)
        engine.bank.load_all()
    except BaseException:
        backend.close()
        raise
    return engine
