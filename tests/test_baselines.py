from __future__ import annotations

from collections import Counter

import pytest
import torch

from softprompt import PromptedModel
from softprompt.evaluate.baselines import (
    BASELINES, SHOT_SEPARATOR, BaselineConfig, BaselineContext, chat_spec, cut_tokens, default_instruction,
    few_shot_spec, instruction_spec, pick_shots, run_baselines, shots_that_fit, tfidf_lr,
)
from softprompt.data import Example, TaskSpec
from softprompt.errors import ConfigError
from softprompt.evaluate import score_classification

TRAIN = [
    Example("the match was won by the home team", "sport"), Example("the team won in extra time", "sport"),
    Example("the home team lost the match", "sport"), Example("shares fell as the market reacted", "business"),
    Example("the central bank cut the interest rate", "business"), Example("the market rose and shares gained", "business"),
    Example("the film won three awards", "film"), Example("the singer released a new album", "film"),
]
TEST = [Example("the team won the match", "sport"), Example("shares and the market fell", "business"),
        Example("a new film and album", "film")]
SPEC = TaskSpec("classify", template="Text: {text}\nTopic:", labels=["business", "film", "sport"], max_length=64)


def test_default_instruction_lists_the_scored_words():
    spec = TaskSpec("classify", labels=["pos", "neg"], verbalizer={"pos": "positive"})
    assert default_instruction(spec, "sentiment") == "Classify the sentiment of the text as one of: positive, neg."
    assert default_instruction(spec) == "Classify the text as one of: positive, neg."
    assert default_instruction(TaskSpec("generate"), "headline") == "Write the headline for the input."
    s = instruction_spec(SPEC, "Say the topic. {text}")
    assert s.template == "Say the topic. (text)\n\nText: {text}\nTopic:" and s.labels == SPEC.labels


def test_pick_shots_balanced_and_seeded():
    shots = pick_shots(TRAIN, 6, "classify", seed=0)
    assert Counter(e.target for e in shots) == {"sport": 2, "business": 2, "film": 2}
    assert shots == pick_shots(TRAIN, 6, "classify", seed=0)
    assert len({e.target for e in pick_shots(TRAIN, 3, "classify", seed=1)}) == 3
    assert len(pick_shots(TRAIN, 50, "classify")) == len(TRAIN)
    assert len(pick_shots(TRAIN, 2, "generate", seed=0)) == 2


def test_cut_tokens_fits(tiny):
    tok = tiny.tokenizer
    text = "the quick brown fox jumps over the lazy dog " * 5
    for n in (1, 3, 10):
        cut = cut_tokens(tok, text, n)
        assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= n and text.startswith(cut)
    assert cut_tokens(tok, "the dog", 50) == "the dog"


def test_few_shot_context_stays_within_max_length(tiny):
    tok = tiny.tokenizer
    long_train = [Example(e.source * 8 + " {text}", e.target) for e in TRAIN]
    shots = pick_shots(long_train, 3, "classify")
    base = TaskSpec("classify", template=SPEC.template, labels=SPEC.labels, max_length=160)
    spec = few_shot_spec(base, shots, tok)
    assert spec.template.endswith(SHOT_SEPARATOR + SPEC.template) and spec.template.count("{text}") == 1
    for e in shots:  # each shot is there, with its label
        assert f"Topic: {e.target}" in spec.template
    shot_part = spec.template[: -len(SHOT_SEPARATOR + base.template)]
    shot_tokens = len(tok(shot_part, add_special_tokens=False)["input_ids"])
    assert 0.3 * 160 < shot_tokens <= 0.5 * 160 + 4  # shots cut to half the context (+ separators)
    for t in ["short", "the match " * 100]:
        assert len(spec.source_ids(tok, t)) <= 160
    # the query's source is the shots followed by the ordinary rendering
    assert spec.source_ids(tok, "short") == tok(spec.template.replace("{text}", "short"))["input_ids"]


def test_few_shot_generation_shots_are_cut(tiny):
    spec = TaskSpec("generate", max_length=160)
    shots = [Example("a long input text " * 20, "a long output text " * 20)] * 2
    fs = few_shot_spec(spec, shots, tiny.tokenizer)
    shot_part = fs.template[: -len(SHOT_SEPARATOR + spec.template)]
    assert len(tiny.tokenizer(shot_part, add_special_tokens=False)["input_ids"]) <= 0.5 * 160 + 4
    assert fs.template.count("output text") >= 2 and len(fs.source_ids(tiny.tokenizer, "input " * 200)) <= 160


def test_tfidf_lr_learns_separable_data():
    m = tfidf_lr(TRAIN * 3, TEST, SPEC.labels)
    assert m["accuracy"] == 1.0 and m["predictions"] == ["sport", "business", "film"]
    assert 0 < m["log_loss"] < 1.1
    flipped = [Example(e.source, {"sport": "business", "business": "sport"}.get(e.target, e.target)) for e in TRAIN]
    assert tfidf_lr(flipped * 3, TEST, SPEC.labels)["accuracy"] < 1.0  # it really learns from the training file
    with pytest.raises(ConfigError, match="2 classes"):
        tfidf_lr(TRAIN[:3], TEST, SPEC.labels)


def test_run_baselines_same_path_as_the_prompt(tiny):
    pm = PromptedModel(tiny)
    ctx = BaselineContext(pm, SPEC, TEST, TRAIN, BaselineConfig(shots=3, instruction="Pick a topic."))
    results, skipped = run_baselines(ctx)
    assert list(results) == list(BASELINES) and skipped == {}
    # bare == the evaluation path with prompt=None; instruction == that path on the longer template
    texts = [e.source for e in TEST]
    bare = score_classification(pm, None, SPEC, texts)
    assert results["bare"]["predictions"] == [SPEC.labels[i] for i in bare.argmax(-1).tolist()]
    instr = score_classification(pm, None, instruction_spec(SPEC, "Pick a topic."), texts)
    gold = torch.tensor([SPEC.labels.index(e.target) for e in TEST])
    assert abs(results["instruction"]["log_loss"] - float(-instr[torch.arange(3), gold].mean())) < 1e-5
    assert results["bare"]["log_loss"] != pytest.approx(results["instruction"]["log_loss"])
    assert " shots" in results["few-shot"]["setup"] and results["tfidf-lr"]["seconds"] >= 0
    chat = score_classification(pm, None, chat_spec(SPEC, "Pick a topic.", pm.base.tokenizer), texts)
    assert abs(results["instruction-chat"]["log_loss"] - float(-chat[torch.arange(3), gold].mean())) < 1e-5
    assert "chat template" in results["instruction-chat"]["setup"]


def test_chat_spec_puts_the_question_in_the_user_turn(tiny):
    tok = tiny.tokenizer
    spec = chat_spec(SPEC, "Pick a {text} topic.", tok)
    assert spec.template == "<s>user\nPick a (text) topic.\n\nText: {text}\nTopic:</s>\n<s>assistant\n"
    assert spec.label_ids(tok) == [tok("business", add_special_tokens=False)["input_ids"],  # the reply: no space
                                   tok("film", add_special_tokens=False)["input_ids"],
                                   tok("sport", add_special_tokens=False)["input_ids"]]
    ids = spec.source_ids(tok, "the team won " * 40)  # the text is cut, the chat frame kept
    assert len(ids) <= SPEC.max_length and tok.decode(ids).endswith("</s>\n<s>assistant\n")


def test_chat_spec_does_not_double_the_bos(tiny):
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny.tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "<s>{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tok("x", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id  # this tokenizer adds the BOS
    spec = chat_spec(SPEC, "Pick.", tok)
    assert spec.template == "[Pick.\n\nText: {text}\nTopic:]"
    assert spec.source_ids(tok, "a").count(tok.bos_token_id) == 1


def test_skips_without_training_data_or_chat_template_and_for_generation(tiny, monkeypatch):
    pm = PromptedModel(tiny)
    results, skipped = run_baselines(BaselineContext(pm, SPEC, TEST))
    assert list(results) == ["bare", "instruction", "instruction-chat"] and set(skipped) == {"few-shot", "tfidf-lr"}
    gen = [Example("shares fell", "market"), Example("the team won", "sport")]
    ctx = BaselineContext(pm, TaskSpec("generate", max_length=32), gen, gen, BaselineConfig(shots=1),
                          gen_kw={"max_new_tokens": 2})
    results, skipped = run_baselines(ctx)
    assert list(results) == ["bare", "instruction", "instruction-chat", "few-shot"]
    assert "rouge_l" in results["few-shot"] and "rouge_l" in results["instruction-chat"]
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)  # a base model's tokenizer
    results, skipped = run_baselines(BaselineContext(pm, SPEC, TEST, TRAIN))
    assert "instruction-chat" not in results and skipped == {"instruction-chat": "the tokenizer has no chat template"}


def test_config_errors():
    with pytest.raises(ConfigError, match="--shots"):
        BaselineConfig(shots=0)
    with pytest.raises(ConfigError, match="--instruction"):
        BaselineConfig(instruction="  ")
    with pytest.raises(ConfigError, match="unknown baseline"):
        run_baselines(BaselineContext(None, SPEC, TEST), ["zero-shot-cot"])


def test_fewer_shots_when_k_do_not_fit(tiny):
    tok = tiny.tokenizer
    roomy = TaskSpec("classify", template=SPEC.template, labels=SPEC.labels, max_length=512)
    assert shots_that_fit(roomy, tok, 5) == 5
    tight = TaskSpec("classify", template=SPEC.template, labels=SPEC.labels, max_length=48)
    k = shots_that_fit(tight, tok, 5)
    assert 1 <= k < 5
    spec = few_shot_spec(tight, pick_shots(TRAIN, k, "classify"), tok)
    shot_part = spec.template[: -len(SHOT_SEPARATOR + tight.template)]
    assert len(tok(shot_part, add_special_tokens=False)["input_ids"]) <= 24 + 2 * k
    ctx = BaselineContext(PromptedModel(tiny), tight, TEST, TRAIN, BaselineConfig(shots=5))
    assert f"{k} shots (of 5" in run_baselines(ctx, ["few-shot"])[0]["few-shot"]["setup"]
