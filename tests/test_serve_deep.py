"""Serving deep prompts (method "prefix"): the stored keys/values are the cached prefix (no prefill on
load); the cached path equals a plain HF forward over a ``DynamicCache`` built from the tensor; a
batch mixing deep prompts, input prompts and the bare model gives each request what it gets alone."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.artifact import prompt_bytes
from softprompt.errors import PromptFileError
from softprompt.serve import ClassifyRequest, Engine, EngineConfig, GenerateRequest
from softprompt.testing import FAMILIES, SLIDING_FAMILIES, SLIDING_WINDOW
from test_serve_engine import TEXTS, TOPICS, same, soft_base, stat

DEEP = {  # name: (P, task, labels)
    "deep-topic": (5, "classify", TOPICS),
    "deep-gen": (2, "generate", None),
}


def deep_tensor(base, P: int, seed: int = 0) -> torch.Tensor:
    """A random deep prompt for ``base``: (layers, 2, kv_heads, P, head_dim)."""
    L, H, hd = base.kv_layout
    return torch.randn(L, 2, H, P, hd, generator=torch.Generator().manual_seed(seed))


def deep_meta(base, P: int, task: str, labels=None, template=None) -> PromptMeta:
    return PromptMeta.for_base(base, P, task=task, labels=labels, template=template, method="prefix")


SHORT = {"classify": "{text}", "generate": "{input}"}
"""Templates that add no tokens: P + source just over a sliding window, the prefix still in reach."""


def add_deep(engine: Engine, names=tuple(DEEP), templates=None) -> None:
    base = engine.pm.base
    for i, name in enumerate(names):
        P, task, labels = DEEP[name]
        meta = deep_meta(base, P, task, labels, (templates or {}).get(task))
        engine.bank.add_tensor(name, deep_tensor(base, P, seed=i), meta)


def add_input(engine: Engine) -> None:
    base = engine.pm.base
    for name, P, task, labels in (("topic", 3, "classify", TOPICS), ("gen", 4, "generate", None)):
        w = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=P).weight
        engine.bank.add_tensor(name, w, PromptMeta.for_base(base, P, task=task, labels=labels))


# ----------------------------------------------------------------------------- the uncached reference


def hf_logprobs(base, kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Log-probs (T, V) of one unpadded row ``ids`` read after a deep prompt by the model's own
    forward: a fresh ``DynamicCache`` holding the tensor's keys/values, an attention mask over
    prefix + tokens, positions from P. Nothing of softprompt's serving path is used."""
    from transformers import DynamicCache

    model = base.model
    L, _, _, P, _ = kv.shape
    cache = DynamicCache(config=model.config)
    kv = kv.to(model.dtype)
    for i in range(L):
        cache.update(kv[i, 0][None], kv[i, 1][None], i)  # (1, H, P, hd) each
    T = len(ids)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, P + T, dtype=torch.long),
                    position_ids=torch.arange(P, P + T)[None], past_key_values=cache, use_cache=True)
    return out.logits.float().log_softmax(-1)[0]


def ref_scores(base, entry, src: list[int]) -> list[float]:
    """Each label's summed token log-prob after ``src``, one full forward per label."""
    scores = []
    for lab in entry.label_ids:
        logp = hf_logprobs(base, entry.tensor.float().cpu(), src + list(lab))
        scores.append(sum(float(logp[len(src) - 1 + j, t]) for j, t in enumerate(lab)))
    return scores


def ref_greedy(base, entry, src: list[int], n: int) -> list[int]:
    """Greedy tokens, re-reading the whole source + generation from the prefix at every step."""
    out: list[int] = []
    while len(out) < n:
        t = int(hf_logprobs(base, entry.tensor.float().cpu(), src + out)[-1].argmax())
        if t == base.tokenizer.eos_token_id:
            break
        out.append(t)
    return out


def check_against_hf(eng: Engine, base, texts) -> None:
    for text in texts:
        e = eng.bank.get("deep-topic")
        src = e.spec.source_ids(base.tokenizer, text)
        got = eng.classify(text, "deep-topic")
        want = torch.tensor(ref_scores(base, e, src))
        torch.testing.assert_close(torch.tensor(got.scores[0]), want, rtol=1e-4, atol=1e-4)
        probs = torch.tensor([got.probs[label] for label in TOPICS])
        torch.testing.assert_close(probs, want.softmax(-1), rtol=1e-4, atol=1e-5)
        g = eng.bank.get("deep-gen")
        ours = eng.generate(text, "deep-gen", max_new_tokens=6)
        assert ours.token_ids == ref_greedy(base, g, g.spec.source_ids(base.tokenizer, text), 6)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", FAMILIES)
def test_deep_prompt_serves_like_hf_forward_over_its_cache(model_root, family):
    base = soft_base(model_root / family, family)
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_deep(eng)
        check_against_hf(eng, base, TEXTS[:2])


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_deep_prompt_on_sliding_window_model(model_root, family):
    assert family in SLIDING_FAMILIES
    base = soft_base(model_root / family, family)
    texts = ["shares fell", "the film won"]
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_deep(eng, templates=SHORT)
        e = eng.bank.get("deep-topic")
        for text in texts:
            n = e.length + len(e.spec.source_ids(base.tokenizer, text))
            assert SLIDING_WINDOW < n < 2 * SLIDING_WINDOW  # the window matters; the prefix stays in reach
        check_against_hf(eng, base, texts)


def test_reference_can_fail(model_root):
    """The comparison is not vacuous: another deep prompt's cache gives other scores."""
    base = soft_base(model_root / "llama", "llama")
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_deep(eng)
        e = eng.bank.get("deep-topic")
        src = e.spec.source_ids(base.tokenizer, TEXTS[0])
        got = torch.tensor(eng.classify(TEXTS[0], "deep-topic").scores[0])
        other = e.tensor.float().cpu() + 0.5 * deep_tensor(base, e.length, seed=9)
        scores = []
        for lab in e.label_ids:
            logp = hf_logprobs(base, other, src + list(lab))
            scores.append(sum(float(logp[len(src) - 1 + j, t]) for j, t in enumerate(lab)))
        assert (got - torch.tensor(scores)).abs().max() > 1e-3


def test_deep_prompt_of_an_input_prompts_keys_values_serves_like_that_prompt(model_root):
    """An input prompt's prefix saved as a deep prompt is the same prompt: same scores, same tokens."""
    from softprompt.prefix import PrefixKV

    base = soft_base(model_root / "gemma", "gemma")
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_input(eng)
        for name in ("topic", "gen"):
            e = eng.bank.get(name)
            kv = torch.stack([torch.stack([k, v]) for k, v in PrefixKV.compute(eng.pm, e.tensor).layers])  # (L, 2, H, P, hd)
            eng.bank.add_tensor(f"deep-{name}", kv, deep_meta(base, e.length, e.spec.kind, e.spec.labels))
        for text in TEXTS[:2]:
            a, b = eng.classify(text, "topic"), eng.classify(text, "deep-topic")
            torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-5, atol=1e-5)
            kw = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
            assert eng.generate(text, "gen", **kw).token_ids == eng.generate(text, "deep-gen", **kw).token_ids


def mixed_requests() -> list:
    reqs = []
    for i, text in enumerate(TEXTS):
        reqs += [
            ClassifyRequest(text, ["deep-topic"]),
            ClassifyRequest(text, ["topic"]),
            ClassifyRequest(text, ["deep-topic", "topic"]),  # an ensemble across methods
            ClassifyRequest(text, [], labels=["yes", "no"]),
            GenerateRequest(text, "deep-gen", max_new_tokens=3 + i, temperature=1.0, seed=i),
            GenerateRequest(text, "gen", max_new_tokens=5),
            GenerateRequest(text, None, max_new_tokens=4, temperature=1.0, seed=20 + i),
            GenerateRequest(text, "deep-gen", max_new_tokens=5),
        ]
    return reqs


def test_mixed_batch_of_deep_input_and_bare_rows_equals_each_alone(model_root):
    base = soft_base(model_root / "qwen2", "qwen2")
    reqs = mixed_requests()
    with Engine(base, EngineConfig(max_batch=64, max_wait_ms=0)) as eng:
        add_deep(eng)
        add_input(eng)
        alone = [eng.submit(r).result() for r in reqs]
    with Engine(base, EngineConfig(max_batch=64, max_wait_ms=500)) as eng:
        add_deep(eng)
        add_input(eng)
        jobs = [eng.prepare(r) for r in reqs]
        eng.enqueue(jobs)
        mixed = [j.result(timeout=60) for j in jobs]
        assert stat(eng, "softprompt_batch_rows_count") == 1  # every classification row in one forward pass
    for a, b in zip(alone, mixed):
        same(a, b)
    ens = mixed[2]  # the cross-method ensemble averages its members' probabilities
    members = torch.tensor(ens.scores).softmax(-1).mean(0)
    torch.testing.assert_close(torch.tensor([ens.probs[label] for label in TOPICS]), members)
    torch.testing.assert_close(torch.tensor(ens.scores[0]), torch.tensor(mixed[0].scores[0]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the bank


def test_deep_prompt_loads_without_a_model_pass(tiny, tmp_path, monkeypatch):
    from softprompt.prefix import PrefixKV

    def no_pass(*a, **k):
        raise AssertionError("a deep prompt must not run through the model")

    monkeypatch.setattr(PrefixKV, "compute", no_pass)
    kv = deep_tensor(tiny, 4)
    save_prompt(tmp_path / "d.safetensors", kv, deep_meta(tiny, 4, "generate"), dtype="float32")
    with Engine(tiny, EngineConfig(max_wait_ms=0), prompts_dir=tmp_path) as eng:
        assert eng.bank.load_all() == ["d"]
        e = eng.bank.get("d")
        assert e.length == 4 and torch.equal(e.prefix.layers[1][1], kv[1, 1])
        assert e.describe()["method"] == "prefix" and e.describe()["shape"] == [*kv.shape]
        up = eng.bank.load_bytes("up", prompt_bytes(kv, deep_meta(tiny, 4, "generate")))
        assert up.source == "upload" and up.describe()["shape"] == [*kv.shape]
        assert eng.generate("shares fell", "up", max_new_tokens=2).finish_reason in ("length", "eos")


def test_deep_prompt_for_another_layout_is_refused(tiny, tiny_family):
    other = tiny_family("gemma")  # 1 kv head of 16 dims, not 2 of 16
    with Engine(tiny, EngineConfig(max_wait_ms=0)) as eng:
        with pytest.raises(PromptFileError, match="does not match base model"):
            eng.bank.add_tensor("x", deep_tensor(other, 3), deep_meta(tiny, 3, "generate"))
        with pytest.raises(PromptFileError, match="does not match base model"):
            eng.bank.load_bytes("y", prompt_bytes(deep_tensor(other, 3), deep_meta(other, 3, "generate")))


def test_deep_prompt_uploads_over_http_like_any_prompt_file(tiny, tmp_path):
    import httpx

    from softprompt.serve import ServeConfig
    from softprompt.serve.http import start_server

    kv = deep_tensor(tiny, 3)
    path = save_prompt(tmp_path / "d.safetensors", kv, deep_meta(tiny, 3, "classify", TOPICS))
    config = ServeConfig(port=0, engine=EngineConfig(max_wait_ms=0))
    srv = start_server(config, Engine(tiny, config.engine))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.put("/v1/prompts/deep", content=path.read_bytes(), headers={"content-type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            assert r.json()["method"] == "prefix" and r.json()["shape"] == [*kv.shape] and r.json()["length"] == 3
            assert c.get("/v1/prompts").json()["prompts"][0]["method"] == "prefix"
            r = c.post("/v1/classify", json={"prompt": "deep", "text": "shares fell"})
            assert r.status_code == 200 and r.json()["label"] in TOPICS
    finally:
        srv.stop()


def test_deep_prompt_on_a_bfloat16_model_is_cached_in_its_dtype(tiny_dir):
    from softprompt import load_base_model

    base = load_base_model(str(tiny_dir), dtype="bfloat16")
    with Engine(base, EngineConfig(max_wait_ms=0)) as eng:
        add_deep(eng)
        e = eng.bank.get("deep-topic")
        assert e.tensor.dtype == torch.bfloat16 and e.prefix.layers[0][0].dtype == torch.bfloat16
        assert eng.classify("shares fell", ["deep-topic"]).label in TOPICS
        assert len(eng.generate("shares fell", "deep-gen", max_new_tokens=3).token_ids) <= 3
