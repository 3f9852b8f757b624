"""The serving backends: what runs the base model behind ``softprompt serve`` (``--backend``), one
entry each, named here above both ``serve`` and ``vllm`` so that neither imports the other to
find one (the engine used to import ``softprompt.vllm`` inside a function while ``vllm`` imports
six ``serve`` modules).

- ``transformers``: the Hugging Face model in this process (``serve/backend.py``);
- ``vllm``: a vLLM server fed ``prompt_embeds``; this process holds the tokenizer and the
  embedding matrix (``vllm/backend.py``).

Which prompt methods a backend serves is the methods' side (``PromptMethod.backends``).

Not here: what a backend is (``serve/backend.py``: :class:`~softprompt.serve.backend.Backend`),
the engine that runs on one (``serve/engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["BACKENDS", "BackendEntry", "BackendName", "backend", "build_backend"]

BackendName = Literal["transformers", "vllm"]
"""``--backend`` values (tests/test_backends.py keeps them equal to :data:`BACKENDS`)."""


@dataclass(frozen=True)
class BackendEntry:
    """One serving backend."""

    name: str
    """The ``--backend`` value."""
    label: str
    """Its name as people write it, in messages."""
    takes: str
    """What it takes a prompt through, in messages ("prompt_embeds")."""
    build: str
    """``"module:function"``: (ServeConfig, base model or None) -> Backend, imported only when chosen."""
    description: str
    """One line for help and docs."""

    def create(self, config, base=None) -> Any:
        """The :class:`~softprompt.serve.backend.Backend` for ``config`` (``base``: an already
        loaded model, for the in-process one). Nothing here imports ``serve``: the registry sits
        above it (``methods`` reads it, and ``serve`` reads ``methods``)."""
        module, function = self.build.split(":")
        return getattr(import_module(module), function)(config, base)


BACKENDS: dict[str, BackendEntry] = {b.name: b for b in (
    BackendEntry("transformers", "transformers", "tensors in this process", "softprompt.serve.backend:from_config",
                 "the Hugging Face model in this process"),
    BackendEntry("vllm", "vLLM", "prompt_embeds", "softprompt.vllm.backend:from_config",
                 "a vLLM server (--vllm-url, or launched from --vllm-python) fed prompt_embeds"),
)}
"""Every serving backend by ``--backend`` name; the first is the default."""


def backend(name: object, where: str = "--backend") -> BackendEntry:
    """The entry of backend ``name``; a one-line :class:`ConfigError` naming the choices when there is none."""
    if isinstance(name, str) and name in BACKENDS:
        return BACKENDS[name]
    raise ConfigError(f"{where} must be one of {', '.join(BACKENDS)}, got {name!r}")


def build_backend(config, base=None) -> Any:
    """The backend ``config.backend`` names, built for ``config`` (a ServeConfig)."""
    return backend(config.backend).create(config, base)
