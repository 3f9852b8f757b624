"""The one scoring path: cached label continuation == brute-force full concatenation."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedModel, SoftPrompt
from softprompt.data import TaskSpec
from softprompt.scoring import classify_scores, find_stop, generate, left_pad, right_pad, sample_next

TEXTS = ["the match was won by the home team", "shares fell", "a new phone with a faster chip was announced today"]


def brute_label_logprob(pm, prompt, src, lab):
    ids = torch.tensor([src + lab])
    with torch.no_grad():
        logp = pm(ids, torch.ones_like(ids), prompt).log_softmax(-1)[0]  # (P + T, V)
    P, S = prompt.shape[0], len(src)
    return sum(float(logp[P + S - 1 + j, t]) for j, t in enumerate(lab))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_rank_classification_equals_full_concatenation(tiny_family, family):
    base = tiny_family(family)
    pm = PromptedModel(base)
    spec = TaskSpec("classify", labels=["sports", "business", "entertainment technology"])
    labels = spec.label_ids(base.tokenizer)
    assert max(len(l) for l in labels) > 1 and min(len(l) for l in labels) >= 1
    prompts = [SoftPrompt.initialize(base.embedding, base.tokenizer, n, "vocab", seed=n)() for n in (2, 5, 3)]
    sources = [spec.source_ids(base.tokenizer, t) for t in TEXTS]
    with torch.no_grad():
        scores = classify_scores(pm, prompts, sources, labels)  # (3, 3)
    for i in range(3):
        for c in range(3):
            assert abs(float(scores[i, c]) - brute_label_logprob(pm, prompts[i], sources[i], labels[c])) < 1e-3


def test_scores_are_differentiable_wrt_prompt(tiny):
    pm = PromptedModel(tiny)
    spec = TaskSpec("classify", labels=["sports", "business politics"])
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "vocab")
    scores = classify_scores(pm, prompt(), [spec.source_ids(tiny.tokenizer, t) for t in TEXTS], spec.label_ids(tiny.tokenizer))
    torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1, 0])).backward()
    assert prompt.weight.grad.abs().sum() > 0


def brute_greedy(pm, prompt, src, n):
    ids = list(src)
    out = []
    for _ in range(n):
        t = torch.tensor([ids])
        with torch.no_grad():
            nxt = int(pm(t, torch.ones_like(t), prompt)[0, -1].argmax())
        if nxt == pm.base.tokenizer.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_greedy_generation_equals_uncached_loop(tiny):
    pm = PromptedModel(tiny)
    prompts = [SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, n, "vocab", seed=n)() for n in (3, 6, 1)]
    spec = TaskSpec("generate")
    sources = [spec.source_ids(tiny.tokenizer, t) for t in TEXTS]
    gens = generate(pm, prompts, sources, max_new_tokens=6)
    for g, p, s in zip(gens, prompts, sources):
        assert g.token_ids == brute_greedy(pm, p, s, 6)


def test_sampling_is_seeded_per_row(tiny):
    pm = PromptedModel(tiny)
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 3, "vocab")()
    src = [TaskSpec("generate").source_ids(tiny.tokenizer, t) for t in TEXTS]
    a = generate(pm, prompt, src, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    b = generate(pm, prompt, src, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_sample_next_pure():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # top_p tiny keeps only the best token even when sampling
    assert sample_next(logits, 1.0, 1e-6, [g, g]).tolist() == [1, 0]
    # ... and a top_p below float32's smallest number (it rounds to 0 against the probabilities)
    assert sample_next(logits, 32.5, 5e-324, [g, g]).tolist() == [1, 0]


def test_padding_and_stops_pure():
    ids, mask = left_pad([[1, 2], [3]], 0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[1, 2], [3]], 0)
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    assert find_stop("hello\nworld END", ["END", "\n"]) == 5
    assert find_stop("hello", ["x"]) == -1
