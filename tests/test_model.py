"""Injection equivalence: prompts prepended to embeddings behave exactly like real tokens."""

from __future__ import annotations

import pytest
import torch

from softprompt import IGNORE_INDEX, PromptedModel, SoftPrompt
from softprompt.base import assert_frozen
from softprompt.model import cache_argument, pack
from softprompt.testing import SLIDING_FAMILIES

FAMILIES = ["llama", "qwen2", "gpt2", "gemma"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "shares fell", "the film won three awards and"]


def encode(tok, texts, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_equal_to_real_tokens_gives_same_logits(tiny_family, family):
    base = tiny_family(family)
    pm = PromptedModel(base)
    ids = base.tokenizer("the market reacted to the interest rate", return_tensors="pt")["input_ids"]
    P = 4
    prompt = pm.embed(ids[:, :P])[0]  # (P, d): embeddings of the first P real tokens
    ref = base.model(input_ids=ids).logits  # (1, T, V)
    ours = pm(ids[:, P:], torch.ones_like(ids[:, P:]), prompt)  # (1, P + T - P, V)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_agree(tiny_family, family):
    base = tiny_family(family)
    pm = PromptedModel(base)
    prompt = SoftPrompt.initialize(base.embedding, base.tokenizer, 5, "vocab", seed=1)
    right = encode(base.tokenizer, TEXTS, "right")
    left = encode(base.tokenizer, TEXTS, "left")
    with torch.no_grad():
        lr = pm(right["input_ids"], right["attention_mask"], prompt())
        ll = pm(left["input_ids"], left["attention_mask"], prompt())
    P = prompt.length
    for i in range(len(TEXTS)):
        n = int(right["attention_mask"][i].sum())
        a = lr[i, : P + n]  # prompt + real tokens at the front
        b = ll[i, ll.shape[1] - (P + n) :]  # pads first, then prompt + real tokens
        # with left padding the prompt sits after the pads; compare only prompt + text
        torch.testing.assert_close(a[P:], b[P:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", *SLIDING_FAMILIES])
def test_mixed_batch_equals_each_row_alone(tiny_family, family):
    base = tiny_family(family)
    tok = base.tokenizer
    pm = PromptedModel(base)
    prompts = [SoftPrompt.initialize(base.embedding, tok, n, "random", seed=n)() for n in (3, 7, 5)]
    for side in ("left", "right"):
        enc = encode(tok, TEXTS, side)
        with torch.no_grad():
            mixed = pm(enc["input_ids"], enc["attention_mask"], prompts)  # (3, 7 + T, V)
            for i, p in enumerate(prompts):
                one = tok(TEXTS[i], return_tensors="pt")["input_ids"]  # (1, n)
                # the model's own forward over the unpadded row: HF's masks, the window by index
                alone = base.model(inputs_embeds=torch.cat([p[None], pm.embed(one)], 1)).logits[0, p.shape[0]:]
                mask = enc["attention_mask"][i].bool()
                got = mixed[i, 7:][mask]  # (n, V) at this row's real tokens; a gap after short prompts
                torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)


def test_target_logprobs_match_full_logits(tiny):
    pm = PromptedModel(tiny)
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "vocab")
    enc = encode(tiny.tokenizer, TEXTS, "left")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # no loss on the first tokens
    with torch.no_grad():
        sums, counts = pm.target_logprobs(enc["input_ids"], enc["attention_mask"], prompt(), labels)
        logp = pm(enc["input_ids"], enc["attention_mask"], prompt()).log_softmax(-1)  # (B, P+T, V)
    P = prompt.length
    full_labels = torch.cat([torch.full((3, P), IGNORE_INDEX), labels], 1)
    for i in range(3):
        total = 0.0
        for t in range(1, full_labels.shape[1]):
            if full_labels[i, t] != IGNORE_INDEX:
                total += float(logp[i, t - 1, full_labels[i, t]])
        assert counts[i] == int((labels[i] != IGNORE_INDEX).sum())
        assert abs(float(sums[i]) - total) < 1e-3


def test_only_the_prompt_gets_gradients(tiny):
    pm = PromptedModel(tiny)
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "vocab")
    enc = encode(tiny.tokenizer, TEXTS, "right")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    sums, counts = pm.target_logprobs(enc["input_ids"], enc["attention_mask"], prompt(), labels)
    (-(sums.sum() / counts.sum())).backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())
    assert_frozen(tiny.model)


def test_unfrozen_base_is_refused(tiny_family):
    base = tiny_family("gpt2")
    p = next(base.model.parameters())
    p.requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="not frozen"):
            PromptedModel(base)
    finally:
        p.requires_grad_(False)


def test_pack_layout():
    emb = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    prompts = [torch.ones(2, 4), torch.full((1, 4), 2.0)]
    packed = pack(emb, mask, prompts, labels=torch.tensor([[5, 6, -100], [-100, 7, 8]]))
    assert packed.inputs_embeds.shape == (2, 5, 4)
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 0, 1, 1]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert packed.labels.tolist() == [[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]]
    assert torch.equal(packed.inputs_embeds[1, 1], torch.full((4,), 2.0))
    assert torch.equal(packed.inputs_embeds[1, 0], torch.zeros(4))


def test_prefix_cache_matches_full_forward(tiny):
    pm = PromptedModel(tiny)
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 6, "vocab")()
    ids = tiny.tokenizer("shares fell as the market", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = pm.prefix_cache(prompt)
        P, T = prompt.shape[0], ids.shape[1]
        out = tiny.model(input_ids=ids, attention_mask=torch.ones(1, P + T, dtype=torch.long),
                         position_ids=torch.arange(P, P + T)[None], **{cache_argument(tiny.model): cache})
        full = pm(ids, torch.ones_like(ids), prompt)[:, P:]
    torch.testing.assert_close(out.logits, full, rtol=1e-4, atol=1e-4)
