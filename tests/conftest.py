"""Shared fixtures: tiny random-weight models built offline, once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one thread, and far more so on a shared, loaded CPU
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in the files that train)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(model_root):
    """Path of a tiny Llama checkpoint directory (config + safetensors + tokenizer)."""
    from softprompt.testing import tiny_model_dir

    return tiny_model_dir(model_root / "llama", "llama")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """A frozen tiny Llama BaseModel."""
    from softprompt import load_base_model

    return load_base_model(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_family(model_root):
    """Factory: a frozen tiny BaseModel of a given family (llama, qwen2, gpt2, gemma)."""
    from softprompt.testing import tiny_base

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_base(model_root / family, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def default_base():
    """The real embedded default model (SmolLM2-135M-Instruct); tests using it are marked real_model."""
    from softprompt import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A vLLM server on the default model (float32, eager, CPU, --enable-prompt-embeds), shared by
    the ``vllm`` tests of the session (test_vllm_serve, test_vllm_backend); their own skipif
    keeps it from starting without the vLLM venv."""
    from types import SimpleNamespace

    from softprompt.base import resolve_model
    from softprompt.vllm.launch import start_vllm

    if os.environ.get("SOFTPROMPT_VLLM_TEST_URL"):  # a server already running (faster reruns while developing)
        yield SimpleNamespace(url=os.environ["SOFTPROMPT_VLLM_TEST_URL"])
        return
    _, model_dir = resolve_model(None)
    # statistics on, as vLLM's own default: its /metrics then tells the client the KV block size
    srv = start_vllm(model_dir, log=tmp_path_factory.mktemp("vllm") / "serve.log", log_stats=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def learn(model_root):
    """A tiny base model that can learn the easy classification task (tests/trainkit.py), per module."""
    from softprompt import load_base_model
    from trainkit import learnable_model_dir

    return load_base_model(str(learnable_model_dir(model_root / "learnable")))


@pytest.fixture()
def easy(tmp_path):
    """The easy classification task's files (trainkit.easy_classification) under tmp_path/data."""
    from trainkit import easy_classification

    return easy_classification(tmp_path / "data")
