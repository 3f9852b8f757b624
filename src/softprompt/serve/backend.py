"""What the engine runs on: a :class:`Backend` bundles the base model as the front end sees it,
the :class:`~.steps.ModelSteps` that run requests, and how the prompt bank prepares a prompt.

``softprompt serve --backend NAME`` picks one from :data:`softprompt.backends.BACKENDS`;
:func:`in_process` is the default (the HF model in this process, :func:`from_config`). The vLLM
backend (``softprompt.vllm.backend``) holds only the tokenizer and the embedding matrix here and
sends the rest to a vLLM server.

Not here: the engine that composes them (engine.py), the steps themselves (steps.py, vllm/steps.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..artifact import PromptMeta
from ..base import BaseModel
from ..model import PromptedModel
from ..prefix import PrefixKV
from .config import EngineConfig
from .metrics import Metrics
from .steps import ModelSteps, TransformersSteps, check_servable

StepsFactory = Callable[[EngineConfig, Metrics, threading.Lock], ModelSteps]
"""(config, metrics, model lock) -> the steps the scheduler's worker runs."""
Prefixer = Callable[[str, torch.Tensor, PromptMeta], PrefixKV]
"""(name, prompt (P, d), its metadata) -> what a request's row carries for that prompt; raises
:class:`~softprompt.errors.PromptFileError` for a prompt the backend cannot serve."""


def _nothing() -> None:
    return None


@dataclass
class Backend:
    """One way of running the model behind the engine."""

    name: str
    """Its ``--backend`` name."""
    pm: Any
    """A :class:`PromptedModel`, or any object whose ``.base`` has the base model's ``name``,
    ``dim``, ``fingerprint``, ``sketch``, ``tokenizer`` and ``device`` (what the bank and
    ``/healthz`` read)."""
    steps: StepsFactory
    prefixer: Prefixer | None = None
    """How the bank turns a loaded prompt into a row's prefix; None: run the model for its
    key/value prefix (``PrefixKV.compute``, in-process backends)."""
    describe: str = ""
    """One line for the start-up message, e.g. ``SmolLM2 (float32)``."""
    close: Callable[[], None] = _nothing
    """Called when the engine stops (e.g. stops a vLLM server it launched)."""


def in_process(base: BaseModel) -> Backend:
    """The HF model in this process (``--backend transformers``)."""
    check_servable(base.model.config)
    pm = PromptedModel(base)

    def steps(config: EngineConfig, metrics: Metrics, lock: threading.Lock) -> ModelSteps:
        return TransformersSteps(pm, config, metrics, lock)

    dtype = str(base.model.dtype).replace("torch.", "")
    return Backend("transformers", pm, steps, None, f"{base.name} ({dtype})")


def from_config(config, base: BaseModel | None = None) -> Backend:
    """The in-process backend for a ServeConfig: ``base``, or the model it names loaded in the
    fastest weight dtype for its device (the ``transformers`` entry of ``softprompt.backends``)."""
    from ..base import load_base_model
    from ..devices import resolve_device
    from ..precision import fast_weight_dtype

    if base is None:
        device = resolve_device(config.device)
        base = load_base_model(config.model, dtype=fast_weight_dtype(config.dtype, device), device=device)
    return in_process(base)
