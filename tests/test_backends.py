"""The serving backends registry (softprompt.backends): one entry per --backend, above both serve
and vllm, so neither package imports the other to find a backend."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from softprompt.backends import BACKENDS, BackendName, backend, build_backend
from softprompt.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "softprompt"


def test_every_backend_is_complete_and_the_choices_are_the_registry():
    from softprompt.methods import METHODS
    from softprompt.serve.config import BACKEND_NAMES

    assert tuple(BACKENDS) == get_args(BackendName) == BACKEND_NAMES
    assert next(iter(BACKENDS)) == "transformers"  # the default
    for name, b in BACKENDS.items():
        assert b.name == name and b.label and b.takes and b.description
        module, function = b.build.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), b.build
    assert all(set(m.backends) <= set(BACKENDS) for m in METHODS.values())


def test_an_unknown_backend_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        backend("tgi")
    assert str(e.value) == "--backend must be one of transformers, vllm, got 'tgi'"


def test_build_backend_calls_the_entry_named_by_the_config(base, monkeypatch):
    from softprompt.serve.config import ServeConfig

    backend_ = build_backend(ServeConfig(), base)  # the in-process one, on the loaded model
    assert backend_.pm.base is base
    calls = []
    monkeypatch.setattr("softprompt.serve.backend.from_config", lambda config, b: calls.append((config.backend, b)) or "made")
    assert build_backend(ServeConfig(), base) == "made" and calls == [("transformers", base)]  # imported by name


def test_serve_never_imports_vllm():
    """The engine used to import softprompt.vllm inside a function while vllm imports serve: a
    package cycle hidden from the layout test. Now the registry above both holds the name."""
    found = []
    for path in (SRC / "serve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "vllm" in node.module.split("."):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.Import) and any("softprompt.vllm" in a.name for a in node.names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, found


@pytest.fixture(scope="module")
def base(tiny):
    return tiny
