"""VLLMSteps without vLLM: a fake client answers with the in-process model (scoring.py), so the
vLLM-backed engine must give the same answers as the in-process engine. Checks the glue: label
scores -> probabilities and ensembles, streamed token ids -> text with our EOS / stop / length
rules, a failing row failing alone, cancel and deadline closing the stream, generation not
blocking the worker, deep prompts refused, and the bank never running a model."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_serve_engine import PROMPTS, TEXTS, add_prompts, soft_base

from softprompt import PromptMeta
from softprompt.errors import PromptFileError
from softprompt.model import PromptedModel
from softprompt.scoring import classify_scores, generate
from softprompt.serve import ClassifyRequest, Engine, EngineConfig, GenerateRequest
from softprompt.serve.backend import Backend
from softprompt.serve.errors import QueueFullError, RequestCancelledError, RequestTimeoutError
from softprompt.vllm import EmbeddingTable, VLLMError
from softprompt.vllm.backend import FrontEnd
from softprompt.vllm.steps import VLLMSteps, embeds_prefix

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> vLLM's finish_reason


class FakeClient:
    """The two calls VLLMSteps makes, answered by the tiny model in this process."""

    def __init__(self, base, delay: float = 0.0):
        self.pm = PromptedModel(base)
        self.table = EmbeddingTable(weight=base.embedding.weight.detach().clone(), tokenizer=base.tokenizer,
                                    name=base.name, source="fake")
        self.delay = delay  # seconds per streamed chunk
        self.fail_on: set[str] = set()  # words whose label requests fail
        self.streams = self.closed = 0
        self.params: list[dict] = []

    def label_scores(self, prompt, source_ids, label_ids):
        time.sleep(self.delay)
        if any(w in self.table.tokenizer.decode(source_ids[0]) for w in self.fail_on):
            raise VLLMError("vLLM refused a request (400): fake")
        p = prompt if prompt is not None else torch.zeros(0, self.table.dim)
        with torch.no_grad():
            return classify_scores(self.pm, p, source_ids, label_ids)  # (1, C)

    def stream(self, embeds=None, token_ids=None, **params):
        self.streams += 1
        self.params.append(params)
        e = embeds if embeds is not None else self.table.embed(token_ids)  # (L, d): the whole input
        with torch.no_grad():
            g = generate(self.pm, e, [[]], max_new_tokens=params["max_tokens"], temperature=params["temperature"],
                         top_p=params["top_p"], stop=params.get("stop", ()), seed=params.get("seed"))[0]
        toks = g.token_ids + ([self.table.tokenizer.eos_token_id] if g.finish_reason == "eos" else [])
        try:
            for i in range(0, len(toks), 2):
                time.sleep(self.delay)
                yield {"token_ids": toks[i : i + 2], "finish_reason": None}
            yield {"token_ids": [], "finish_reason": FINISH[g.finish_reason]}
        finally:
            self.closed += 1


def vllm_engine(client: FakeClient, native: Engine, **config) -> Engine:
    """An engine on VLLMSteps whose front end holds only the embedding table (no model at all),
    with the in-process engine's prompts."""
    def steps(cfg, metrics, lock):
        return VLLMSteps(client, cfg, metrics, workers=8)

    backend = Backend("vllm", FrontEnd(client.table), steps, embeds_prefix, "fake vLLM")
    eng = Engine(None, EngineConfig(max_wait_ms=2, **config), backend=backend)
    for e in native.bank.entries():
        eng.bank.add_tensor(e.name, e.tensor, e.meta)
    return eng.start()


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def native(base):
    eng = Engine(base, EngineConfig(max_wait_ms=2))
    add_prompts(eng)
    with eng:
        yield eng


@pytest.fixture(scope="module")
def fake(base):
    return FakeClient(base)


@pytest.fixture(scope="module")
def engine(fake, native):
    eng = vllm_engine(fake, native)
    yield eng
    eng.stop()


def test_the_bank_wraps_rows_and_never_runs_a_model(engine):
    entry = engine.bank.get("topic")
    assert entry.length == PROMPTS["topic"][0] and entry.prefix.layers == ()
    assert torch.equal(entry.prefix.rows, entry.tensor)
    assert not hasattr(engine.pm, "model")


def test_classification_and_ensembles_equal_the_in_process_engine(engine, native):
    for names in (["topic"], ["sentiment"], ["topic", "topic2"]):
        for text in TEXTS[:2]:
            a, b = engine.classify(text, names), native.classify(text, names)
            assert a.label == b.label and a.prompts == b.prompts
            assert max(abs(a.probs[k] - b.probs[k]) for k in b.probs) < 1e-5
            assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-4)
    bare = engine.classify(TEXTS[0], None, labels=["yes", "no"])
    ref = native.classify(TEXTS[0], None, labels=["yes", "no"])
    assert abs(bare.probs["yes"] - ref.probs["yes"]) < 1e-5


@pytest.mark.parametrize("kw", [dict(max_new_tokens=7), dict(max_new_tokens=12, stop=["e"]), dict(max_new_tokens=5)])
def test_generation_and_streaming_equal_the_in_process_engine(engine, native, kw):
    for prompt in ("gen", "gen2", None):
        a, b = engine.generate(TEXTS[2], prompt, **kw), native.generate(TEXTS[2], prompt, **kw)
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
        assert "".join(engine.stream(TEXTS[2], prompt, **kw)) == a.text


def test_sampling_parameters_reach_the_server(engine, fake):
    engine.generate(TEXTS[0], "gen", max_new_tokens=3, temperature=0.7, top_p=0.9, seed=11, stop=["x"])
    assert fake.params[-1] == {"max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 11, "stop": ["x"]}


def test_a_failing_row_fails_its_request_alone(engine, fake):
    fake.fail_on.add("zebra")
    try:
        jobs = [engine.submit(ClassifyRequest(t, ["topic"])) for t in ("good news", "zebra", "shares fell")]
        with pytest.raises(VLLMError, match="fake"):
            jobs[1].result(30)
        assert jobs[0].result(30).label and jobs[2].result(30).label
    finally:
        fake.fail_on.clear()


def test_cancel_and_deadline_close_the_stream_and_generation_does_not_block(base, native):
    slow = FakeClient(base, delay=0.2)
    eng = vllm_engine(slow, native, request_timeout=2.0)
    try:
        job = eng.submit(GenerateRequest(TEXTS[0], "gen", max_new_tokens=40))
        t0 = time.monotonic()
        assert eng.classify(TEXTS[1], ["topic"]).label  # answered while the generation streams
        assert time.monotonic() - t0 < 1.5 and not job.done
        job.cancel()
        with pytest.raises(RequestCancelledError):
            job.result(5)
        late = eng.submit(GenerateRequest(TEXTS[0], "gen", max_new_tokens=40))
        with pytest.raises(RequestTimeoutError):
            late.result(10)
        deadline = time.monotonic() + 5
        while slow.closed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.closed == 2 and not eng.steps.generating_jobs  # both streams closed early
        assert eng.steps.open_streams == 0
    finally:
        eng.stop()


def test_mixed_concurrent_requests(engine, native):
    reqs = [ClassifyRequest(TEXTS[i % 4], ["topic" if i % 2 else "sentiment"]) for i in range(6)]
    reqs += [GenerateRequest(TEXTS[i], "gen" if i % 2 else "gen2", max_new_tokens=6) for i in range(4)]
    out: dict[int, object] = {}

    def run(i):
        out[i] = engine.submit(reqs[i]).result(60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(reqs):
        ref = native.submit(r).result(60)
        if isinstance(r, ClassifyRequest):
            assert out[i].label == ref.label
        else:
            assert out[i].token_ids == ref.token_ids


def test_deep_prompts_are_refused_in_one_line(engine, base):
    meta = PromptMeta.for_base(base, 3, task="classify", labels=["a", "b"])
    meta.method = "prefix"  # a deep prompt: (layers, 2, kv_heads, P, head_dim)
    L, H, hd = base.kv_layout
    with pytest.raises(PromptFileError, match="deep prompt .* vLLM takes a prompt only as input embeddings") as e:
        engine.bank.add_tensor("deep", torch.zeros(L, 2, H, 3, hd), meta)
    assert "\n" not in str(e.value) and "deep" not in engine.bank
    assert isinstance(embeds_prefix("x", torch.zeros(2, 4), PromptMeta.for_base(base, 2)).rows, torch.Tensor)


def test_backend_flags_are_checked_and_registered():
    from softprompt.errors import ConfigError
    from softprompt.serve.config import BACKEND_NAMES, ServeConfig
    from softprompt.backends import BACKENDS

    assert set(BACKENDS) == set(BACKEND_NAMES) == {"transformers", "vllm"}
    for kw, msg in [(dict(backend="tgi"), "--backend must be one of transformers, vllm"),
                    (dict(vllm_url="http://127.0.0.1:1"), "need --backend vllm"),
                    (dict(backend="vllm", vllm_url="127.0.0.1:8000"), "http:// or https://"),
                    (dict(backend="vllm", vllm_url="http://h:1", vllm_python="/x/bin/python"), "not both")]:
        with pytest.raises(ConfigError, match=msg):
            ServeConfig(**kw)


def test_queue_limits_hold_as_vllm_takes_at_most_max_batch_rows(base, native):
    slow = FakeClient(base, delay=0.5)
    eng = vllm_engine(slow, native, max_batch=1, max_ensemble=1, max_queue=2, request_timeout=20)
    try:
        jobs, full = [], 0
        for i in range(6):  # 1 in flight, 1 waiting for room, 2 queued, the rest refused
            try:
                jobs.append(eng.submit(ClassifyRequest(TEXTS[i % 4], ["topic"])))
            except QueueFullError:
                full += 1
            time.sleep(0.05)
        assert full >= 1
        assert all(j.result(30).label for j in jobs)
    finally:
        eng.stop()


def test_vllm_cache_config_is_read_from_its_metrics():
    from softprompt.vllm.server_check import cache_config

    line = ('vllm:cache_config_info{_block_size_resolved="True",block_size="32",cache_dtype="auto",'
            'enable_prefix_caching="True",engine="0",sliding_window="None"} 1.0')
    text = "# HELP vllm:cache_config_info Information\n# TYPE vllm:cache_config_info gauge\n" + line + "\n"
    assert cache_config(text) == (32, True)
    assert cache_config(text.replace('"True",engine', '"False",engine').replace('"32"', '"16"')) == (16, False)
    assert cache_config("vllm:num_requests_running 0.0\n") == (None, None)  # --disable-log-stats: no gauge
    assert cache_config(line.replace('block_size="32"', 'block_size="None"')) == (None, True)


def test_a_prompt_that_leaves_a_partial_kv_block_is_warned_about_once(base, caplog):
    from softprompt.vllm.steps import BlockCheck

    meta = PromptMeta.for_base(base, 2)
    d = base.dim
    hook = BlockCheck(32)
    with caplog.at_level("WARNING", logger="softprompt.serve.engine"):
        assert hook("whole", torch.zeros(64, d), meta).length == 64
        assert not caplog.records  # 2 whole blocks: nothing to say
        hook("twenty", torch.zeros(20, d), meta)
        hook("another", torch.zeros(20, d), meta)
    assert len(caplog.records) == 1
    assert "'twenty' has 20 virtual tokens" in caplog.text and "last 20 rows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="softprompt.serve.engine"):
        BlockCheck(None)("x", torch.zeros(20, d), meta)  # block size unknown: no claim
    assert not caplog.records
