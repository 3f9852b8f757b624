"""``softprompt serve --backend vllm`` against a real vLLM server (marker ``vllm``; needs the vLLM
venv, ``make vllm-env``). The same prompts are served by our in-process engine, and every answer
of the vLLM-backed server is compared with it over HTTP: greedy tokens equal, class probabilities
within PROB_TOL, seeded sampling reproducible (vLLM samples with its own random streams, so
sampled tokens cannot equal ours), limits, auth and errors as the native server, one-line errors
at start. Fast tests of the same logic without vLLM: test_vllm_steps.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from test_vllm_serve import HEADLINES, LABELS, TEMPLATE, make_prompt

from softprompt import PromptMeta, save_prompt
from softprompt.cli import main
from softprompt.errors import PromptFileError
from softprompt.serve import create_engine
from softprompt.serve.config import EngineConfig, ServeConfig
from softprompt.serve.http import start_server
from softprompt.vllm import VLLMError
from softprompt.vllm.launch import vllm_venv

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (vllm_venv() / "bin" / "vllm").is_file(),
                       reason=f"no vLLM venv at {vllm_venv()} (build it with `make vllm-env`)"),
]

PROB_TOL = 2e-3
"""Most |class probability difference| vs our engine, float32 on both sides (measured ~1e-5)."""
KEY = "test-key"


@pytest.fixture(scope="module")
def prompts(default_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    make_prompt(default_base, d / "topic.safetensors", "classify", "Classify the topic of the news headline",
                template=TEMPLATE, labels=LABELS, verbalizer={"world news": "world"})
    make_prompt(default_base, d / "topic2.safetensors", "classify", "What is this news headline about",
                template=TEMPLATE, labels=LABELS)
    make_prompt(default_base, d / "story.safetensors", "generate", "Write a short story about the sea",
                template="Title: {input}\nStory:")
    return d


@pytest.fixture(scope="module")
def front(vllm_server, prompts):
    config = ServeConfig(prompts_dir=str(prompts), port=0, backend="vllm", vllm_url=vllm_server.url, api_key=KEY,
                         engine=EngineConfig(max_new_tokens=64, max_wait_ms=2))
    srv = start_server(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def native(default_base, prompts):
    engine = create_engine(ServeConfig(prompts_dir=str(prompts), port=0), base=default_base)
    with engine:
        yield engine


def call(srv, path, body=None, *, key=KEY, data=None, method=None):
    """(status, JSON body) of a request to the softprompt server."""
    raw = data if data is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(srv.url + path, raw, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text.startswith("{") else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_the_front_end_holds_no_model(front):
    engine = front.engine
    assert engine.backend.name == "vllm" and not hasattr(engine.pm, "model")
    assert engine.bank.get("topic").prefix.layers == ()  # the bank ran no model
    status, health = call(front, "/healthz")
    assert status == 200 and health["prompts"] == 3


def test_greedy_generation_and_stream_equal_our_engine(front, native):
    for text in ["The old lighthouse", "A storm at night"]:
        status, got = call(front, "/v1/generate", {"prompt": "story", "text": text, "max_new_tokens": 16})
        ours = native.generate(text, "story", max_new_tokens=16)
        assert status == 200
        assert (got["text"], got["tokens"], got["finish_reason"]) == (ours.text, len(ours.token_ids), ours.finish_reason)
        assert front.engine.generate(text, "story", max_new_tokens=16).token_ids == ours.token_ids  # the same API
    status, sse = call(front, "/v1/generate", {"prompt": "story", "text": "The old lighthouse", "max_new_tokens": 16,
                                               "stream": True})
    pieces = [json.loads(line[5:]) for line in sse.splitlines() if line.startswith("data:")]
    assert "".join(p.get("text", "") for p in pieces[:-1]) == native.generate("The old lighthouse", "story",
                                                                              max_new_tokens=16).text
    bare = front.engine.generate("The capital of France is", None, max_new_tokens=8)
    assert bare.token_ids == native.generate("The capital of France is", None, max_new_tokens=8).token_ids


def test_stop_strings_max_tokens_and_seeded_sampling(front, native):
    full = native.generate("The old lighthouse", "story", max_new_tokens=16)
    word = full.text.split()[3]
    ours = native.generate("The old lighthouse", "story", max_new_tokens=16, stop=[word])
    got = call(front, "/v1/generate", {"prompt": "story", "text": "The old lighthouse", "max_new_tokens": 16,
                                       "stop": [word]})[1]
    assert got["finish_reason"] == ours.finish_reason == "stop" and got["text"] == ours.text
    body = {"prompt": "story", "text": "A storm at night", "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95}
    a = call(front, "/v1/generate", body | {"seed": 7})[1]
    b = call(front, "/v1/generate", body | {"seed": 7})[1]
    c = call(front, "/v1/generate", body | {"seed": 8})[1]
    assert a == b and a["tokens"] == 12  # seeded: reproducible
    assert c["text"] != a["text"]


def test_classification_and_ensembles_equal_our_engine(front, native):
    worst = 0.0
    for text in HEADLINES[:4]:
        for prompt in ("topic", ["topic", "topic2"]):
            status, got = call(front, "/v1/classify", {"prompt": prompt, "text": text})
            ours = native.classify(text, prompt)
            assert status == 200 and got["label"] == ours.label
            worst = max(worst, max(abs(got["probs"][k] - ours.probs[k]) for k in LABELS))
    assert worst < PROB_TOL
    bare = call(front, "/v1/classify", {"text": HEADLINES[0], "labels": ["yes", "no"]})[1]
    assert abs(bare["probs"]["yes"] - native.classify(HEADLINES[0], None, labels=["yes", "no"]).probs["yes"]) < PROB_TOL


def test_mixed_prompts_in_concurrent_requests(front, native):
    reqs = [("/v1/classify", {"prompt": ["topic", "topic2"][i % 2], "text": HEADLINES[i]}) for i in range(6)]
    reqs += [("/v1/generate", {"prompt": "story", "text": t, "max_new_tokens": 10}) for t in ["Fishing", "Gulls"]]
    reqs += [("/v1/generate", {"text": "Once upon a time", "max_new_tokens": 10})]
    out: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, call(front, *reqs[i])[1])) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (path, body) in enumerate(reqs):
        if path == "/v1/classify":
            assert out[i]["label"] == native.classify(body["text"], body["prompt"]).label
        else:
            assert out[i]["text"] == native.generate(body["text"], body.get("prompt"), max_new_tokens=10).text


def test_upload_at_run_time_and_deep_prompts_refused(front, default_base, tmp_path):
    path = make_prompt(default_base, tmp_path / "s.safetensors", "classify", "Is this review positive or negative",
                       template="Review: {text}\nSentiment:", labels=["positive", "negative"])
    status, _ = call(front, "/v1/prompts/sentiment", data=path.read_bytes(), method="PUT")
    assert status == 201
    status, got = call(front, "/v1/classify", {"prompt": "sentiment", "text": "I loved this film"})
    assert status == 200 and set(got["probs"]) == {"positive", "negative"}
    # a deep prompt file (format 2) for this very base, uploaded: refused in one line naming why
    L, H, hd = default_base.kv_layout
    meta = PromptMeta.for_base(default_base, 2, task="classify", labels=["a", "b"], method="prefix")
    deep = save_prompt(tmp_path / "deep.safetensors", torch.zeros(L, 2, H, 2, hd), meta)
    status, got = call(front, "/v1/prompts/deep", data=deep.read_bytes(), method="PUT")
    assert status == 422, (status, got)
    message = got["error"]["message"]
    assert "deep prompt" in message and "--backend transformers" in message and "\n" not in message
    with pytest.raises(PromptFileError, match="deep prompt .* serve it with --backend transformers"):
        front.engine.bank.add_tensor("deep", torch.zeros(L, 2, H, 2, hd), meta)


def test_bad_requests_auth_and_limits_as_the_native_server(front):
    assert call(front, "/v1/classify", {"prompt": "topic", "text": "x"}, key=None)[0] == 401
    assert call(front, "/v1/classify", {"prompt": "nope", "text": "x"})[0] == 404
    assert call(front, "/v1/classify", {"prompt": "story", "text": "x"})[0] == 422  # wrong task
    assert call(front, "/v1/generate", {"prompt": "story", "text": "x", "max_new_tokens": 65})[0] == 422
    assert call(front, "/v1/generate", {"prompt": "story", "text": ""})[0] == 422
    assert call(front, "/v1/classify", data=b"{not json")[0] == 400
    assert call(front, "/v1/prompts/bad", data=b"not a prompt file", method="PUT")[0] == 422


def test_start_up_errors_are_one_line(vllm_server, capsys, tmp_path):
    with pytest.raises(VLLMError, match="cannot reach a vLLM server at http://127.0.0.1:9") as e:
        create_engine(ServeConfig(port=0, backend="vllm", vllm_url="http://127.0.0.1:9"))
    assert "\n" not in str(e.value)
    assert main(["serve", "--backend", "vllm", "--vllm-url", "http://127.0.0.1:9", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err
    from softprompt.testing import tiny_model_dir  # a base model other than the server's

    other = tiny_model_dir(tmp_path / "llama", "llama")
    with pytest.raises(VLLMError, match="tokenizes differently|another base model"):
        create_engine(ServeConfig(port=0, backend="vllm", vllm_url=vllm_server.url, model=str(other)))



def test_a_client_that_disconnects_frees_its_row_on_vllm(front):
    import http.client
    import time
    from urllib.parse import urlparse

    u = urlparse(front.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": "story", "text": "A long voyage", "max_new_tokens": 64, "stream": True}
    conn.request("POST", "/v1/generate", json.dumps(body), {"Content-Type": "application/json",
                                                            "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline()  # the first event arrived: the row runs on vLLM
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    cancelled = {"kind": "generate", "outcome": "cancelled"}
    steps = front.engine.steps
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (not steps.generating_jobs and steps.open_streams == 0
                and front.engine.metrics.registry.get_sample_value("softprompt_requests_total", cancelled)):
            break
        time.sleep(0.1)
    assert not steps.generating_jobs
    assert front.engine.metrics.registry.get_sample_value("softprompt_requests_total", cancelled) >= 1
    assert steps.open_streams == 0  # its stream to vLLM was closed (which makes vLLM abort the request)


def test_openai_api_on_the_vllm_backend(front, native):
    """The OpenAI routes run on whichever backend the server has: the official client against a
    vLLM-backed server gets our engine's greedy text, streams it, and gets a prompt's label."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0)
    assert {"topic", "topic2", "story"} <= {m.id for m in client.models.list()}
    ours = native.generate("The old lighthouse", "story", max_new_tokens=12)
    out = client.completions.create(model="story", prompt="The old lighthouse", max_tokens=12, temperature=0)
    assert out.choices[0].text == ours.text and out.choices[0].finish_reason == ours.finish_reason
    chunks = list(client.completions.create(model="story", prompt="The old lighthouse", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ours.text
    ref = native.classify("Stocks rallied after the earnings report", "topic")
    got = client.completions.create(model="topic", prompt="Stocks rallied after the earnings report", logprobs=2)
    assert got.choices[0].text == ref.label
    with pytest.raises(BadRequestError, match="n"):
        client.completions.create(model="story", prompt="x", n=2)
