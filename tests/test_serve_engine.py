"""The serving engine: cached prefixes == full concatenation; a mixed batch == each request alone;
ensembles, the bare model, streaming, limits, queue and timeouts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from softprompt import PromptedModel, PromptMeta, SoftPrompt, load_base_model, save_prompt, wrap_base_model
from softprompt.errors import PromptFileError
from softprompt.scoring import classify_scores, generate
from softprompt.serve import ClassifyRequest, Engine, EngineConfig, GenerateRequest
from softprompt.serve.admission import BARE_GENERATE
from softprompt.serve.errors import (
    BadPromptNameError, EngineStoppedError, InputTooLongError, InvalidRequestError, QueueFullError,
    RequestTimeoutError, UnknownPromptError, WrongTaskError,
)
from softprompt.testing import SLIDING_FAMILIES, SLIDING_WINDOW, tiny_model_dir

TEXTS = ["the match was won by the home team", "shares fell", "a new phone with a faster chip was announced",
         "the film won three awards"]
TOPICS = ["sports", "business politics", "technology"]
PROMPTS = {  # name: (P, task, labels, verbalizer)
    "topic": (3, "classify", TOPICS, None),
    "topic2": (6, "classify", TOPICS, {"business politics": "market"}),
    "sentiment": (7, "classify", ["positive", "negative"], {"positive": "great", "negative": "terrible"}),
    "gen": (4, "generate", None, None),
    "gen2": (1, "generate", None, None),
}


def soft_base(path, family="llama"):
    """A tiny model with shrunk embeddings: random models copy their last token when logits are
    sharp; softer logits make sampled tokens and label scores vary, so equivalence can fail."""
    base = load_base_model(str(tiny_model_dir(path, family)))
    with torch.no_grad():
        base.embedding.weight.mul_(0.05)
    return wrap_base_model(base.model, base.tokenizer, f"soft-{family}")


def add_prompts(engine: Engine, names=tuple(PROMPTS)):
    base = engine.pm.base
    for name in names:
        P, task, labels, verb = PROMPTS[name]
        w = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=P).weight
        engine.bank.add_tensor(name, w, PromptMeta.for_base(base, P, task=task, labels=labels, verbalizer=verb))


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def engine(base):
    eng = Engine(base, EngineConfig(max_batch=16, max_wait_ms=2))
    add_prompts(eng)
    with eng:
        yield eng


def uncached_scores(engine, name, text):
    e = engine.bank.get(name)
    src = e.spec.source_ids(engine.tokenizer, text)
    with torch.no_grad():
        return classify_scores(engine.pm, e.tensor, [src], [list(x) for x in e.label_ids])[0]


def uncached_generation(engine, name, text, **kw):
    if name is None:
        prompt, spec = torch.zeros(0, engine.pm.base.dim), BARE_GENERATE
    else:
        e = engine.bank.get(name)
        prompt, spec = e.tensor, e.spec
    return generate(engine.pm, prompt, [spec.source_ids(engine.tokenizer, text)], **kw)[0]


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_cached_prefix_equals_full_concatenation(model_root, family):
    base = soft_base(model_root / family, family)
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_prompts(eng, ["topic", "gen"])
        e = eng.bank.get("topic")
        for text in TEXTS[:2]:
            got = torch.tensor(eng.classify(text, "topic").scores[0])
            torch.testing.assert_close(got, uncached_scores(eng, "topic", text), rtol=1e-4, atol=1e-4)
            # and against one full forward over [prompt | source | label] per label
            src = e.spec.source_ids(base.tokenizer, text)
            for c, lab in enumerate(e.label_ids):
                ids = torch.tensor([src + list(lab)])
                with torch.no_grad():
                    logp = eng.pm(ids, torch.ones_like(ids), e.tensor).log_softmax(-1)[0]  # (P + T, V)
                at = e.length + len(src) - 1
                brute = sum(float(logp[at + j, t]) for j, t in enumerate(lab))
                assert abs(float(got[c]) - brute) < 1e-3
            for kw in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
                ours = eng.generate(text, "gen", max_new_tokens=8, **kw)
                ref = uncached_generation(eng, "gen", text, max_new_tokens=8, **kw)
                assert ours.token_ids == ref.token_ids and ours.text == ref.text


def hf_logprobs(base, prompt, ids):
    """Log-probs from the model's own forward over one unpadded row [prompt | ids], (P + T, V):
    no padding, so HF's index-based sliding window is exact."""
    emb = torch.cat([prompt.to(base.model.dtype), base.model.get_input_embeddings()(torch.tensor(ids))])[None]
    with torch.no_grad():
        return base.model(inputs_embeds=emb).logits.float().log_softmax(-1)[0]


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_window_model_serves_like_its_own_unpadded_forward(model_root, family):
    base = soft_base(model_root / family, family)
    reqs = ([ClassifyRequest(t, [name]) for t in TEXTS for name in ("topic", "sentiment")]
            + [GenerateRequest(t, "gen", max_new_tokens=10) for t in TEXTS[:2]])
    with Engine(base, EngineConfig(max_batch=64, max_wait_ms=500)) as eng:
        add_prompts(eng, ["topic", "sentiment", "gen"])
        jobs = [eng.prepare(r) for r in reqs]
        eng.enqueue(jobs)  # one batch: prompts of 3 and 7 tokens, sources of 2-9 words: gaps inside rows
        got = [j.result(timeout=60) for j in jobs]
        assert stat(eng, "softprompt_batch_rows_count") == 1
    for r, g in zip(reqs, got):
        e = eng.bank.get(r.prompts[0] if isinstance(r, ClassifyRequest) else r.prompt)
        src = e.spec.source_ids(base.tokenizer, r.text)
        assert e.length + len(src) > SLIDING_WINDOW  # the window matters
        if isinstance(r, ClassifyRequest):
            for c, lab in enumerate(e.label_ids):
                logp = hf_logprobs(base, e.tensor, src + list(lab))
                at = e.length + len(src) - 1
                assert abs(g.scores[0][c] - sum(float(logp[at + j, t]) for j, t in enumerate(lab))) < 1e-3
        else:
            ref: list[int] = []
            while len(ref) < r.max_new_tokens:
                t = int(hf_logprobs(base, e.tensor, src + ref)[-1].argmax())
                if t == base.tokenizer.eos_token_id:
                    break
                ref.append(t)
            assert g.token_ids == ref


def test_servable_layer_kinds():
    from transformers import Qwen3NextConfig

    from softprompt.errors import ModelLoadError
    from softprompt.serve.steps import check_servable
    from softprompt.testing import tiny_config

    config = tiny_config("gemma3")
    for impl in ("eager", "sdpa"):  # sliding + full layers: served
        config._attn_implementation = impl
        check_servable(config)
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ModelLoadError, match="eager or sdpa"):
        check_servable(config)
    with pytest.raises(ModelLoadError, match="linear_attention"):
        check_servable(Qwen3NextConfig(num_hidden_layers=4))


def stat(engine, name, kind="classify", **labels):
    return engine.metrics.registry.get_sample_value(name, {"kind": kind, **labels}) or 0


def mixed_requests():
    reqs = []
    for i, text in enumerate(TEXTS):
        reqs += [
            ClassifyRequest(text, ["topic"]),
            ClassifyRequest(text, ["sentiment"]),
            ClassifyRequest(text, ["topic", "topic2"]),
            ClassifyRequest(text, [], labels=["yes", "no"]),
            GenerateRequest(text, "gen", max_new_tokens=3 + i, temperature=1.0, seed=i),
            GenerateRequest(text, "gen2", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=10 + i),
            GenerateRequest(text, None, max_new_tokens=5, temperature=1.0, seed=20 + i),
            GenerateRequest(text, "gen", max_new_tokens=4),
        ]
    return reqs


def same(a, b):
    if hasattr(a, "scores"):
        assert a.label == b.label and a.prompts == b.prompts
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-4, atol=1e-4)
    else:
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_mixed_batch_equals_each_request_alone(base):
    reqs = mixed_requests()
    with Engine(base, EngineConfig(max_batch=64, max_wait_ms=0)) as eng:
        add_prompts(eng)
        alone = [eng.submit(r).result() for r in reqs]  # one at a time: batches of one
        n_rows = sum(len(r.prompts) or 1 for r in reqs if isinstance(r, ClassifyRequest))
        assert stat(eng, "softprompt_batch_rows_sum") == n_rows
        assert stat(eng, "softprompt_batch_rows_count") == sum(isinstance(r, ClassifyRequest) for r in reqs)
    with Engine(base, EngineConfig(max_batch=64, max_wait_ms=500)) as eng:
        add_prompts(eng)
        jobs = [eng.prepare(r) for r in reqs]
        eng.enqueue(jobs)  # all arrive together: one classify pass, one generation batch
        mixed = [j.result(timeout=60) for j in jobs]
        assert stat(eng, "softprompt_batch_rows_sum") == n_rows
        assert stat(eng, "softprompt_batch_rows_count") == 1  # every classification row in one forward pass
        assert stat(eng, "softprompt_batch_rows_count", "generate") <= max(r.max_new_tokens for r in reqs
                                                                           if isinstance(r, GenerateRequest))
    for a, b in zip(alone, mixed):
        same(a, b)
    # and the uncached reference agrees with both
    for r, got in zip(reqs, mixed):
        if isinstance(r, GenerateRequest):
            ref = uncached_generation(eng, r.prompt, r.text, max_new_tokens=r.max_new_tokens,
                                      temperature=r.temperature, top_p=r.top_p, seed=r.seed)
            assert ref.token_ids == got.token_ids


def test_rows_join_a_running_generation_and_leave_when_done(engine):
    reqs = [GenerateRequest(TEXTS[i % 4], ["gen", "gen2", None][i % 3], max_new_tokens=2 + 3 * i,
                            temperature=1.0, seed=i) for i in range(5)]
    alone = [engine.submit(r).result() for r in reqs]
    first_token = threading.Event()
    long = GenerateRequest(TEXTS[0], "gen", max_new_tokens=40, temperature=1.0, seed=99)
    long_job = engine.submit(long, listener=lambda kind, _: first_token.set())
    assert first_token.wait(30)
    jobs = [engine.submit(r) for r in reqs]  # join the batch while `long` is running
    for a, j in zip(alone, jobs):
        same(a, j.result(timeout=60))
    assert long_job.result(timeout=60).token_ids == uncached_generation(
        engine, "gen", TEXTS[0], max_new_tokens=40, temperature=1.0, seed=99).token_ids


def test_ensemble_averages_member_probabilities(engine):
    a = engine.classify(TEXTS[0], "topic")
    b = engine.classify(TEXTS[0], "topic2")
    both = engine.classify(TEXTS[0], ["topic", "topic2"])
    assert both.prompts == ["topic", "topic2"] and len(both.scores) == 2
    for label in TOPICS:
        assert abs(both.probs[label] - (a.probs[label] + b.probs[label]) / 2) < 1e-5
    assert both.label == max(both.probs, key=both.probs.get)
    assert abs(sum(both.probs.values()) - 1) < 1e-5


def test_bare_model_classification_and_generation(engine):
    r = engine.classify(TEXTS[1], labels=["sports", "business"], template="News: {text}\nTopic:")
    assert r.prompts == [] and set(r.probs) == {"sports", "business"}
    from softprompt.data import TaskSpec

    spec = TaskSpec("classify", template="News: {text}\nTopic:", labels=["sports", "business"])
    with torch.no_grad():
        ref = classify_scores(engine.pm, torch.zeros(0, engine.pm.base.dim), [spec.source_ids(engine.tokenizer, TEXTS[1])],
                              spec.label_ids(engine.tokenizer))[0]
    torch.testing.assert_close(torch.tensor(r.scores[0]), ref, rtol=1e-4, atol=1e-4)
    g = engine.generate(TEXTS[2], None, max_new_tokens=6, temperature=1.0, seed=3)
    assert g.token_ids == uncached_generation(engine, None, TEXTS[2], max_new_tokens=6, temperature=1.0, seed=3).token_ids


def test_stream_pieces_add_up_to_the_final_text(engine):
    for kw in ({"temperature": 1.0, "seed": 4}, {"temperature": 1.0, "seed": 8, "stop": ["e"]}):
        pieces = list(engine.stream(TEXTS[3], "gen", max_new_tokens=12, **kw))
        final = engine.generate(TEXTS[3], "gen", max_new_tokens=12, **kw)
        assert "".join(pieces) == final.text
        assert len(pieces) >= 1
        if "stop" in kw:
            assert "e" not in final.text


def test_abandoned_stream_is_cancelled(engine):
    cancelled = lambda: stat(engine, "softprompt_requests_total", "generate", outcome="cancelled")  # noqa: E731
    before = cancelled()
    stream = engine.stream(TEXTS[0], "gen", max_new_tokens=200, temperature=1.0, seed=0)
    next(stream)
    stream.close()
    for _ in range(500):
        if cancelled() > before and engine.metrics.registry.get_sample_value("softprompt_generation_rows") == 0:
            break
        time.sleep(0.01)
    assert cancelled() == before + 1
    assert engine.metrics.registry.get_sample_value("softprompt_generation_rows") == 0


def test_stop_string_ends_generation(engine):
    kw = dict(max_new_tokens=20, temperature=1.0, seed=1)
    full = engine.generate(TEXTS[0], "gen", **kw)
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2:][:2]
    cut = engine.generate(TEXTS[0], "gen", stop=[stop], **kw)
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.token_ids) < 20


def test_sampling_is_reproducible_and_seed_dependent(engine):
    a = engine.generate(TEXTS[1], "gen", max_new_tokens=10, temperature=1.0, seed=1)
    b = engine.generate(TEXTS[1], "gen", max_new_tokens=10, temperature=1.0, seed=1)
    c = engine.generate(TEXTS[1], "gen", max_new_tokens=10, temperature=1.0, seed=2)
    assert a.token_ids == b.token_ids != c.token_ids


# ----------------------------------------------------------------------------- errors and limits


def test_request_errors(engine):
    cases = [
        (ClassifyRequest("hi", ["nope"]), UnknownPromptError, "unknown prompt 'nope'"),
        (ClassifyRequest("hi", ["gen"]), WrongTaskError, "generate prompt"),
        (GenerateRequest("hi", "topic"), WrongTaskError, "classify prompt"),
        (ClassifyRequest("   ", ["topic"]), InvalidRequestError, "empty"),
        (ClassifyRequest("word " * 600, ["topic"]), InputTooLongError, "--max-input-tokens 512"),
        (ClassifyRequest("hi", ["topic", "sentiment"]), InvalidRequestError, "same labels"),
        (ClassifyRequest("hi", ["topic"] * 9), InvalidRequestError, "--max-ensemble"),
        (ClassifyRequest("hi", ["topic"], labels=["a", "b"]), InvalidRequestError, "only for the bare model"),
        (ClassifyRequest("hi", []), InvalidRequestError, "give labels"),
        (ClassifyRequest("hi", [], labels=["a"]), InvalidRequestError, "at least 2 labels"),
        (GenerateRequest("hi", "gen", max_new_tokens=0), InvalidRequestError, "max_new_tokens"),
        (GenerateRequest("hi", "gen", max_new_tokens=10_000), InvalidRequestError, "max_new_tokens"),
        (GenerateRequest("hi", "gen", temperature=-1), InvalidRequestError, "temperature"),
        (GenerateRequest("hi", "gen", top_p=0), InvalidRequestError, "top_p"),
        (GenerateRequest("hi", "gen", stop=[""]), InvalidRequestError, "stop"),
    ]
    for req, cls, msg in cases:
        with pytest.raises(cls, match=msg):
            engine.submit(req)
    assert engine.queue_depth == 0
    assert engine.classify("still serving", "topic").label in TOPICS


def test_prompts_are_checked_against_the_base_model(engine, tiny_family, tmp_path):
    other = tiny_family("gpt2")  # same width, other weights
    w = SoftPrompt.initialize(other.embedding, other.tokenizer, 3, "vocab").weight
    path = save_prompt(tmp_path / "other.safetensors", w, PromptMeta.for_base(other, 3, task="classify", labels=TOPICS))
    with pytest.raises(PromptFileError, match="fingerprint"):
        engine.bank.load_bytes("other", path.read_bytes())
    with pytest.raises(PromptFileError, match="not a valid safetensors|truncated"):
        engine.bank.load_bytes("junk", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxxxx")
    untyped = save_prompt(tmp_path / "untyped.safetensors", engine.bank.get("topic").tensor, PromptMeta.for_base(engine.pm.base, 3))
    with pytest.raises(PromptFileError, match="task type"):
        engine.bank.load_bytes("untyped", untyped.read_bytes())
    for bad in ("../etc/passwd", "a//b", "/a", "a/../b", "a/b/c/d/e", ".hidden", "", "x" * 200):
        with pytest.raises(BadPromptNameError):
            engine.bank.load_bytes(bad, path.read_bytes())
    assert "other" not in engine.bank and "junk" not in engine.bank


def test_prompts_folder_load_reload_unload(base, tmp_path):
    w = SoftPrompt.initialize(base.embedding, base.tokenizer, 5, "vocab").weight
    save_prompt(tmp_path / "t.safetensors", w, PromptMeta.for_base(base, 5, task="classify", labels=["a", "b"]))
    with Engine(base, prompts_dir=tmp_path) as eng:
        assert eng.bank.load_all() == ["t"]
        before = eng.classify("hello", "t")
        save_prompt(tmp_path / "t.safetensors", w, PromptMeta.for_base(base, 5, task="classify", labels=["b", "a"]))
        eng.bank.load_file("t")  # reload: new labels order
        after = eng.classify("hello", "t")
        assert list(after.probs) == ["b", "a"] and abs(after.probs["a"] - before.probs["a"]) < 1e-5
        eng.bank.unload("t")
        with pytest.raises(UnknownPromptError):
            eng.classify("hello", "t")
        with pytest.raises(UnknownPromptError, match="no prompt file"):
            eng.bank.load_file("missing")
        with pytest.raises(UnknownPromptError):
            eng.bank.unload("t")


def test_queue_full_timeout_and_unload_while_queued(base):
    cfg = EngineConfig(max_batch=2, max_ensemble=2, max_wait_ms=0, max_queue=3, request_timeout=0.3)
    with Engine(base, cfg) as eng:
        add_prompts(eng, ["topic", "gen"])
        with eng.model_lock:  # the worker stalls on its first batch
            first = eng.submit(ClassifyRequest("one", ["topic"]))
            t0 = time.monotonic()
            while eng.queue_depth and time.monotonic() - t0 < 5:  # wait for the worker to take it
                time.sleep(0.005)
            queued = [eng.submit(ClassifyRequest(f"q{i}", ["topic"])) for i in range(3)]
            with pytest.raises(QueueFullError, match="--max-queue 3"):
                eng.submit(ClassifyRequest("too many", ["topic"]))
            eng.bank.unload("topic")  # accepted requests keep their prompt
            time.sleep(0.4)  # past the deadline of the queued ones
        with pytest.raises(RequestTimeoutError, match="took more than --request-timeout"):
            first.result(timeout=10)  # it was running: its deadline ended it all the same
        for job in queued:
            with pytest.raises(RequestTimeoutError, match="waited more than --request-timeout"):
                job.result(timeout=10)
        assert stat(eng, "softprompt_requests_total", outcome="timeout") == 4
        assert eng.queue_depth == 0  # the slots were freed at the deadline, not when the worker came back
        assert eng.generate("after", "gen", max_new_tokens=2).finish_reason in ("length", "eos")  # still serving


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` until true (a test that waits on a thread never sleeps a fixed time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_stop_fails_waiting_requests(base):
    eng = Engine(base, EngineConfig(max_wait_ms=0)).start()
    add_prompts(eng, ["topic"])
    with eng.model_lock:
        jobs = [eng.submit(ClassifyRequest("t0", ["topic"]))]
        wait_for(lambda: eng.queue_depth == 0)  # the worker took it and waits for the model
        jobs += [eng.submit(ClassifyRequest(f"t{i}", ["topic"])) for i in (1, 2)]  # these stay queued
        stopper = threading.Thread(target=eng.stop)
        stopper.start()
        wait_for(lambda: not eng.running)  # stop() has begun before the worker gets the model back
    stopper.join(10)
    outcomes = []
    for j in jobs:
        try:
            outcomes.append(j.result(timeout=10).label)
        except EngineStoppedError:
            outcomes.append("stopped")
    assert outcomes[1:] == ["stopped", "stopped"]  # queued ones fail, none is left hanging
    assert outcomes[0] != "stopped"  # the batch already taken finishes
    with pytest.raises(EngineStoppedError):
        eng.submit(ClassifyRequest("late", ["topic"]))


@pytest.mark.real_model
def test_default_model_cached_equals_uncached(default_base):
    with Engine(default_base, EngineConfig(max_wait_ms=0)) as eng:
        w = SoftPrompt.initialize(default_base.embedding, default_base.tokenizer, 8, "labels", labels=TOPICS).weight
        eng.bank.add_tensor("topic", w, PromptMeta.for_base(default_base, 8, task="classify", labels=TOPICS))
        eng.bank.add_tensor("gen", w, PromptMeta.for_base(default_base, 8, task="generate"))
        jobs = [eng.submit(ClassifyRequest(t, ["topic"])) for t in TEXTS] + [eng.submit(GenerateRequest(TEXTS[0], "gen", max_new_tokens=8))]
        results = [j.result(timeout=60) for j in jobs]
        for t, r in zip(TEXTS, results):
            torch.testing.assert_close(torch.tensor(r.scores[0]), uncached_scores(eng, "topic", t), rtol=1e-3, atol=1e-3)
        assert results[-1].token_ids == uncached_generation(eng, "gen", TEXTS[0], max_new_tokens=8).token_ids
