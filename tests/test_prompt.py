from __future__ import annotations

import pytest
import torch

from softprompt import INIT_STRATEGIES, ConfigError, SoftPrompt


def test_registry_has_the_four_strategies():
    assert set(INIT_STRATEGIES) == {"random", "vocab", "text", "labels"}


@pytest.mark.parametrize("strategy", ["random", "vocab", "text", "labels"])
def test_each_strategy_gives_p_by_d_and_is_seeded(tiny, strategy):
    kw = dict(text="classify the topic", labels=["sports", "business"])
    a = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 7, strategy, seed=3, **kw)
    b = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 7, strategy, seed=3, **kw)
    assert a.weight.shape == (7, tiny.dim) and a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight)
    assert a.weight.requires_grad


def test_random_init_matches_embedding_scale(tiny):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 200, "random")
    ref = tiny.embedding.weight.std().item()
    assert 0.7 * ref < p.weight.std().item() < 1.3 * ref


def test_vocab_init_uses_real_non_special_tokens(tiny):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 10, "vocab")
    W = tiny.embedding.weight
    special = set(tiny.tokenizer.all_special_ids)
    for row in p.weight:
        match = (W == row).all(1).nonzero().flatten().tolist()
        assert match and not (set(match) & special)


def test_text_init_tiles_and_cuts(tiny):
    ids = tiny.tokenizer("sports", add_special_tokens=False)["input_ids"]
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, len(ids) * 2 + 1, "text", text="sports")
    W = tiny.embedding.weight
    expect = (ids * 3)[: len(ids) * 2 + 1]
    assert torch.equal(p.weight, W[expect])


def test_labels_init_averages_multi_token_labels(tiny):
    labels = ["entertainment", "sports"]
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 5, "labels", labels=labels)
    ids = tiny.tokenizer(" entertainment", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    torch.testing.assert_close(p.weight[0], tiny.embedding.weight[ids].mean(0))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(length=0, strategy="vocab"), "prompt-length"),
        (dict(length=3, strategy="nope"), "unknown --init"),
        (dict(length=3, strategy="text"), "init-text"),
        (dict(length=3, strategy="labels"), "label"),
    ],
)
def test_bad_init_arguments(tiny, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, **kw)
