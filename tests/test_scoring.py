"""The one scoring path: cached label continuation == brute-force full concatenation."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedModel, SoftPrompt
from softprompt.data import TaskSpec
from softprompt.scoring import classify_scores, generate, left_pad, right_pad, sample_next

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


def copied_label_logprobs(pm, state, label_ids):
    """The label scoring this project used before label branches shared the source's cache: the
    cache repeated once per label (memory grew with labels x source x layers). Kept here only as
    the reference the tree must equal."""
    from softprompt.model import cache_layers, make_cache
    from softprompt.scoring import pad_id

    B, C = state.mask.shape[0], len(label_ids)
    lab, lmask = right_pad(label_ids, pad_id(pm), state.last_hidden.device)  # (C, Lmax)
    scores = pm.project(state.last_hidden).float().log_softmax(-1)[:, lab[:, 0]]  # (B, C)
    if lab.shape[1] == 1:
        return scores
    layers = [(k.repeat_interleave(C, 0), v.repeat_interleave(C, 0)) for k, v in cache_layers(state.cache)]
    cont = lab[:, :-1].repeat(B, 1)  # (B·C, L-1)
    mask = torch.cat([state.mask.repeat_interleave(C, 0), lmask[:, :-1].repeat(B, 1)], 1)
    pos = state.next_pos.repeat_interleave(C)[:, None] + torch.arange(cont.shape[1])  # (B·C, L-1)
    hidden, _ = pm.decode(pm.embed(cont), mask, pos, past_key_values=make_cache(layers), use_cache=False)
    sel = lmask[:, 1:].repeat(B, 1).bool()
    lp = pm.project(hidden[sel]).float().log_softmax(-1)
    tok_lp = lp.gather(1, lab[:, 1:].repeat(B, 1)[sel][:, None])[:, 0]
    rest = torch.zeros(B * C, dtype=tok_lp.dtype).index_add(0, sel.nonzero(as_tuple=True)[0], tok_lp)
    return scores + rest.view(B, C)


LABEL_SETS = {
    "one-token": ["a", "b", "c"],
    "multi-token": ["sports", "business politics", "entertainment technology", "science"],
    "ragged-many": [f"label {w}" for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()]
                   + ["x", "the quick brown fox jumps"],
}


@pytest.mark.parametrize("family,labels,deep", [
    ("llama", "multi-token", False), ("llama", "ragged-many", True), ("llama", "one-token", False),
    ("gpt2", "ragged-many", False), ("qwen2", "multi-token", True), ("gemma", "ragged-many", False),
    ("mistral", "ragged-many", False), ("gemma2", "multi-token", True),
])
def test_label_tree_equals_the_cache_copied_per_label(tiny_family, family, labels, deep):
    """Scores and prompt gradients of the shared-cache label tree == the per-label cache copies,
    for padded batches (sources of different lengths), input and deep prompts, full and sliding
    attention. Tolerance from the arithmetic: both compute the same sums in float32 over different
    tensor shapes (masked keys add exact zeros), so they differ only in summation order; each
    result is a reduction over at most n = max(hidden, keys, vocab) terms, bounded by
    n * eps32 * (sum of magnitudes) (Higham's gamma_n), and |score| <= 40 here."""
    from softprompt.prefix import source_state
    from softprompt.scoring import label_logprobs

    base = tiny_family(family)
    pm = PromptedModel(base)
    spec = TaskSpec("classify", labels=LABEL_SETS[labels])
    label_ids = spec.label_ids(base.tokenizer)
    sources = [spec.source_ids(base.tokenizer, t) for t in TEXTS]  # 3 lengths: left padding
    g = torch.Generator().manual_seed(0)
    if deep:
        L, H, hd = base.kv_layout
        prompt = (torch.randn(L, 2, H, 3, hd, generator=g) * 0.5).requires_grad_()
    else:
        prompt = (torch.randn(4, base.dim, generator=g) * 0.5).requires_grad_()
    results = []
    for fn in (label_logprobs, copied_label_logprobs):
        scores = fn(pm, source_state(pm, prompt, sources), label_ids)  # (B, C)
        weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((scores * weights).sum(), prompt)
        results.append((scores.detach(), grad))
    (tree, tree_grad), (copied, copied_grad) = results
    n = max(base.dim, base.tokenizer.vocab_size, 64)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(tree, copied, rtol=0, atol=n * eps * 40)
    scale = copied_grad.abs().max().item()
    torch.testing.assert_close(tree_grad, copied_grad, rtol=0, atol=n * eps * max(scale, 1.0) * 4)
    assert copied_grad.abs().sum() > 0  # the gradient reaches the prompt


def test_label_tree_pure():
    from softprompt.scoring import label_tree

    assert label_tree([[5], [6]]) is None
    ids, group, offset, targets = label_tree([[5, 7, 9], [6], [8, 3]])
    assert ids.tolist() == [5, 7, 8] and group.tolist() == [0, 0, 2]
    assert offset.tolist() == [0, 1, 0] and targets.tolist() == [7, 9, 3]


def test_padding_pure():
    ids, mask = left_pad([[1, 2], [3]], 0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[1, 2], [3]], 0)
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]
