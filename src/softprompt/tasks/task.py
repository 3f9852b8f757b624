"""What a task kind is: the :class:`Task` contract every entry of the registry fills.

A task kind says what an example's target is and everything that follows from it: the default
template and data fields, how a target becomes tokens, the training loss, how a prompt is scored
and which metrics it reports, the default init, what ``predict`` and the server answer, and the
baselines that apply. The code that reads data, trains, evaluates, predicts and serves asks the
kind's entry instead of comparing kind names, so a new kind is one entry (and its own module) in
``tasks/``.

Not here: the registry (``tasks/__init__.py``), the kinds themselves (``classify.py``,
``generate.py``), what the kinds share (``shared.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Spec = Any
"""A :class:`~softprompt.data.TaskSpec` (read by attribute: ``template``, ``labels``, ``words``,
``source_ids`` ...); not imported, as data.py itself asks this registry."""

Example = Any
"""A :class:`~softprompt.data.Example` (``source``, ``target``)."""


@dataclass(frozen=True)
class Serving:
    """How the serving engine runs a job of a kind (``Job.kind`` is the kind's name): the
    ``ModelSteps`` hooks the scheduler calls (serve/steps.py, vllm/steps.py) and the row budget its
    jobs count against (serve/batching.select_jobs)."""

    start: Callable[[Any], Callable[[list], None]]
    """steps -> the hook that takes new jobs of this kind (their prompt prefixes filled first)."""
    running: Callable[[Any], list]
    """steps -> its jobs under way."""
    advance: Callable[[Any], Callable[[], None]]
    """steps -> the hook that moves the jobs under way on by one step."""
    decodes: bool
    """Its rows hold slots of the running generation batch (``free_generate_rows``), rather than
    one forward pass of at most ``max_rows``."""


@dataclass(frozen=True)
class Task:
    """One task kind: its facts and the behaviour the rest of softprompt asks it for."""

    name: str
    """``--task`` and ``PromptMeta.task``: "classify", "generate"."""
    about: str
    """One line on what it is (the docs, ``--help``)."""
    # --- data ---
    placeholder: str
    """The template placeholder of the source text (``{text}``, ``{input}``)."""
    template: str
    """The default template."""
    fields: tuple[str, str]
    """(source field, target field) in data files."""
    field_flags: tuple[str, str]
    """The CLI flags that rename the source and target fields."""
    labelled: bool
    """Its targets are a fixed label set: stripped when read, never integer class ids without names,
    stratified when sampled, checked against the prompt's labels, calibratable, shown per class,
    and served by ranking the labels (a ``/classify`` job; the OpenAI API answers with a label)."""
    check_spec: Callable[[Spec], None]
    """Refuse a spec this kind cannot run (labels, verbalizer): DataError, one line."""
    # --- training ---
    label_ids: Callable[[Spec, Any], list[list[int]] | None]
    """(spec, tokenizer) -> each label's token ids as a continuation of the source, or None (no label set)."""
    encode_target: Callable[[Spec, Any, str], int | list[int]]
    """(spec, tokenizer, target text) -> what a training row holds: a label index or target token ids."""
    loss: Callable[..., tuple[torch.Tensor, list[int]]]
    """``(pm, prompts, rows, label_ids, share_prefix, classify_loss) -> (losses (n,) float32, the
    index into rows of each)`` for rows all of this kind (train/objective.py groups them by kind)."""
    init: Callable[[bool], str]
    """(an init text is given) -> the init strategy ``--init auto`` picks."""
    # --- evaluation ---
    generates: bool
    """Scored by generating text: takes the generation settings (``--max-new-tokens``, ``--stop``)."""
    evaluate: Callable[..., dict]
    """``(pm, prompt, spec, examples, batch_size, biases, **gen_kw) -> metrics`` with
    ``predictions`` (``softprompt.evaluate.evaluate_prompt``)."""
    primary_metric: str
    """The dev metric that picks the best prompt (early stopping)."""
    columns: tuple[tuple[str, str], ...]
    """Comparison table columns: (metric key, header)."""
    report_columns: tuple[tuple[str, str], ...]
    """Metrics plotted in the HTML report: (metric key, title)."""
    baselines: tuple[str, ...]
    """The baselines (``evaluate.baselines.BASELINES`` names) that apply, in table order."""
    instruction: Callable[[Spec, str | None], str]
    """(spec, task name) -> the default instruction of the instruction baselines."""
    shot_target: Callable[[Spec, Example, Any, int], str]
    """(spec, example, tokenizer, token budget) -> the target text of one in-context example."""
    shot_frame: Callable[[Spec, Any, int], int]
    """(spec, tokenizer, fewest target text tokens) -> tokens one in-context example needs besides
    its source text."""
    # --- prediction and serving ---
    predict: Callable[..., list[dict]]
    """``(predictor, texts) -> one answer per text`` (``softprompt predict``'s JSON lines)."""
    serving: Serving
    """How the serving engine runs its jobs (``/classify`` or ``/generate``)."""
