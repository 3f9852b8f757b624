"""The prompt methods: one :class:`PromptMethod` entry per method, holding what the code that
trains, saves, exports, imports, reports and serves prompts needs to know about it.

- ``prompt``: an input prompt, P virtual-token embeddings (P, d) (``input_prompt.py``);
- ``prefix``: a deep prompt, P keys/values at every layer (layers, 2, kv_heads, P, head_dim)
  (``deep_prompt.py``).

Code outside this package asks the entry (``method(meta.method).tensor_name``) instead of
comparing names (``tests/test_methods.py`` keeps it so), as PEFT's method registry does: a new
method is one entry here plus its own module.

Not here: the contract itself (method.py), reparameterisations (trainable.py), what a backend is
(serve/backend.py).
"""

from __future__ import annotations

from ..backends import BACKENDS
from ..errors import ConfigError, PromptFileError
from .deep_prompt import DEEP_PROMPT
from .input_prompt import INPUT_PROMPT
from .method import PromptMethod

METHODS: dict[str, PromptMethod] = {m.name: m for m in (INPUT_PROMPT, DEEP_PROMPT)}
"""Every prompt method by name (``--method``, ``PromptMeta.method``); the first is the default."""


__all__ = ["METHODS", "PromptMethod", "method", "method_for_peft", "check_backend"]


def method(name: object, where: str | None = None, error: type[Exception] = ConfigError) -> PromptMethod:
    """The entry of method ``name``; ``error`` (one line, naming ``where`` and the choices) when
    there is none."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    head = f"{where}: " if where else ""
    raise error(f"{head}unknown prompt method {name!r}; choose one of {', '.join(METHODS)}")


def method_for_peft(peft_type: str) -> PromptMethod | None:
    """The method a PEFT adapter of ``peft_type`` imports as, or None when none does."""
    return next((m for m in METHODS.values() if peft_type in m.peft_imports), None)


def check_backend(name: str, backend: str, where: str) -> None:
    """Raise :class:`~softprompt.errors.PromptFileError` (one line) when ``--backend backend``
    cannot serve a prompt of method ``name``: what it holds, what the backend takes instead,
    and where it can go."""
    m = method(name, where, PromptFileError)
    if backend in m.backends:
        return
    entry = BACKENDS.get(backend)
    label, channel = (entry.label, entry.takes) if entry else (backend, backend)
    takes = " or ".join(o.holds for o in METHODS.values() if backend in o.backends) or "nothing"
    raise PromptFileError(
        f"{where}: {m.a} (method {m.name!r}) holds {m.holds}, which {label} cannot serve: {label} takes a prompt only "
        f"as {takes} ({channel}); serve it with --backend {m.backends[0]}, or export it with --format peft ({m.peft_type})")
