from __future__ import annotations

import torch

from softprompt import PromptedModel, SoftPrompt
from softprompt.data import Example, TaskSpec
from softprompt.evaluate import (
    classification_metrics, evaluate_prompt, generation_metrics, score_classification,
)
from softprompt.scoring import classify_scores

TEXTS = ["the match was won", "shares fell as the market reacted", "the film won three awards", "a new phone"]


def test_batched_scores_equal_one_at_a_time(tiny):
    pm = PromptedModel(tiny)
    spec = TaskSpec("classify", labels=["sports", "business", "entertainment"])
    prompt = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "vocab")()
    batched = score_classification(pm, prompt, spec, TEXTS, batch_size=3)
    for i, t in enumerate(TEXTS):
        with torch.no_grad():
            one = classify_scores(pm, prompt, [spec.source_ids(tiny.tokenizer, t)], spec.label_ids(tiny.tokenizer))
        torch.testing.assert_close(batched[i], one[0].log_softmax(-1), rtol=1e-4, atol=1e-4)
    assert torch.allclose(batched.exp().sum(-1), torch.ones(len(TEXTS)))


def test_bare_model_scoring_equals_plain_model(tiny):
    pm = PromptedModel(tiny)
    spec = TaskSpec("classify", labels=["sports", "business"])
    bare = score_classification(pm, None, spec, TEXTS[:1])
    src = spec.source_ids(tiny.tokenizer, TEXTS[0])
    lab = spec.label_ids(tiny.tokenizer)
    with torch.no_grad():
        ref = []
        for l in lab:
            ids = torch.tensor([src + l])
            lp = tiny.model(input_ids=ids).logits.log_softmax(-1)[0]
            ref.append(sum(float(lp[len(src) - 1 + j, t]) for j, t in enumerate(l)))
    torch.testing.assert_close(bare[0], torch.tensor(ref).log_softmax(-1), rtol=1e-4, atol=1e-4)


def test_classification_metrics_by_hand():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert abs(m["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-9
    assert m["confusion"]["matrix"] == [[1, 1], [0, 2]]


def test_generation_metrics():
    m = generation_metrics(["the cat sat", "hello"], ["the cat sat", "goodbye"])
    assert m["exact_match"] == 0.5 and 0.5 <= m["rouge_l"] < 1 and 0 < m["chrf"] < 1


def test_evaluate_prompt_both_kinds(tiny):
    pm = PromptedModel(tiny)
    ex = [Example(t, l) for t, l in zip(TEXTS, ["sports", "business", "sports", "business"])]
    m = evaluate_prompt(pm, None, TaskSpec("classify", labels=["business", "sports"]), ex)
    assert 0 <= m["accuracy"] <= 1 and len(m["predictions"]) == 4
    g = evaluate_prompt(pm, None, TaskSpec("generate"), [Example("shares fell", "market")], max_new_tokens=3)
    assert set(g) >= {"exact_match", "rouge_l", "chrf", "predictions"}
