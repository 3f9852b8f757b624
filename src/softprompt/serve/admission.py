"""Admission: a request validated, bounded and tokenized into a :class:`~.jobs.Job`, in the
caller's thread, before it is queued (LitServe's ``decode_request``). A request that fails here
costs the model nothing.

Not here: the bounds themselves (limits.py, pure), the queue (scheduler.py), the model (steps.py).
"""

from __future__ import annotations

import os

import torch

from ..calibration import member_biases
from ..data import TaskSpec
from ..errors import DataError
from ..prefix import PrefixKV
from .bank import PromptBank, PromptEntry
from .config import EngineConfig
from .errors import InputTooLongError, InvalidRequestError, WrongTaskError
from .jobs import ClassifyRequest, GenerateRequest, Job, Listener, Row
from .prefill import PrefixSlot
from .limits import (
    CHARS_PER_TOKEN_LIMIT, MIN_TEMPERATURE, check_label_ids, check_label_names, check_scoring, check_seed, check_stop,
    check_unicode, classify_cost, scoring_tokens,
)

BARE_GENERATE = TaskSpec("generate", template="{input}", max_length=1 << 30)
"""Bare-model generation: the text is the whole input (no template)."""


def _row(slot: PrefixSlot | None, source_ids: list[int], label_ids=None) -> Row:
    """A row of a prompt's slot (None: the bare model); its prefix is set now if computed, else
    by the worker (the bank's ``fill``) before the row is read."""
    if slot is None:
        return Row(PrefixKV.empty(), source_ids, label_ids)
    return Row(slot.get() if slot.filled else None, source_ids, label_ids, slot)


class Admission:
    """Turns requests into jobs: checks every field and bound, resolves prompt names in the bank,
    tokenizes the source (and bare-model labels)."""

    def __init__(self, bank: PromptBank, tokenizer, config: EngineConfig):
        self.bank = bank
        self.tokenizer = tokenizer
        self.config = config
        self._bare_specs: dict[tuple, TaskSpec] = {}

    def prepare(self, request: ClassifyRequest | GenerateRequest, listener: Listener | None = None) -> Job:
        """Validate, bound and tokenize a request into a :class:`Job` (not queued yet)."""
        if isinstance(request, ClassifyRequest):
            return self._prepare_classify(request, listener)
        if isinstance(request, GenerateRequest):
            return self._prepare_generate(request, listener)
        raise TypeError(f"not a request: {type(request).__name__}")

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
            pairs = [(None, spec, lab)]
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
            pairs = [(e.slot, e.spec, e.label_ids) for e in entries]
            labels = list(labels)
        rows = [_row(slot, self._source_ids(spec, req.text), lab) for slot, spec, lab in pairs]
        lens = [[len(x) for x in r.label_ids] for r in rows]
        check_scoring(sum(scoring_tokens(r.prefix_length, len(r.source_ids), n) for r, n in zip(rows, lens)), self.config)
        cost = sum(classify_cost(len(r.source_ids), n) for r, n in zip(rows, lens))
        job = Job("classify", req, rows, labels, listener, cost=cost)
        job.biases = member_biases([e.meta for e in entries]) if names else None  # --calibrate
        return job

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
            slot, spec = None, BARE_GENERATE
        else:
            entry = self._entry(req.prompt, "generate")
            slot, spec = entry.slot, entry.spec
        job = Job("generate", req, [_row(slot, self._source_ids(spec, req.text))], None, listener)
        if req.temperature > 0:  # seeded here, so a bad seed fails this request alone, before it is queued
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            job.generator = torch.Generator().manual_seed(seed)
        return job
