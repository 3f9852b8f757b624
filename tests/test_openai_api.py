"""The OpenAI-compatible routes, driven by the official ``openai`` client against a live server
(tiny model): each answer equals the native API's for the same prompt and input (greedy and
seeded generation, classification labels and probabilities), streams concatenate to the whole
answer, and refusals and errors arrive as the client's exceptions, naming the field."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest

from softprompt.serve.errors import InputTooLongError, InvalidRequestError, QueueFullError, RequestTimeoutError
from softprompt.serve.http.openai_schemas import openai_error

from test_serve_http import serve, write_prompts
from test_serve_engine import soft_base

openai = pytest.importorskip("openai")

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    srv = serve(base, write_prompts(base, tmp_path_factory.mktemp("prompts")), max_wait_ms=2, max_upload_bytes=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def native(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat_text(server, content: str) -> str:
    """What the server feeds the model for one user message (the tiny tokenizer adds no BOS)."""
    return server.engine.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                       add_generation_prompt=True)


def test_models_list_the_base_model_and_every_prompt(client, server):
    base = server.engine.pm.base.name
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {base, "topic", "topic2", "sentiment", "gen", "gen2"}
    assert models[base].parent is None and models[base].owned_by == "softprompt"
    assert {models[n].parent for n in models if n != base} == {base}
    topic = client.models.retrieve("topic")
    assert topic.id == "topic" and topic.softprompt == {"task": "classify", "length": 3,
                                                        "labels": ["sports", "business politics", "technology"]}
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.code == "model_not_found" and "'nope' does not exist" in e.value.message


@pytest.mark.parametrize("model", ["gen", None])
def test_greedy_completion_equals_native_generate(client, native, server, model):
    name = model or server.engine.pm.base.name
    text = "the match was won by"
    out = client.completions.create(model=name, prompt=text, max_tokens=6, temperature=0)
    ref = native.post("/v1/generate", json={"text": text, "max_new_tokens": 6, **({"prompt": model} if model else {})}).json()
    (choice,) = out.choices
    assert choice.text == ref["text"] and out.object == "text_completion" and out.model == name
    assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[ref["finish_reason"]]
    # usage counts the real tokens of the rendered input; the prompt's virtual tokens are apart
    entry = server.engine.bank.get(model) if model else None
    ids = entry.spec.source_ids(server.engine.tokenizer, text) if entry else server.engine.tokenizer(text)["input_ids"]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == ref["tokens"]
    assert out.usage.total_tokens == len(ids) + ref["tokens"]
    assert out.softprompt == {"prompt": model, "task": "generate", "virtual_tokens": entry.length if entry else 0,
                              "probs": None}
    # a list of one prompt is the same request
    again = client.completions.create(model=name, prompt=[text], max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text


def test_streamed_completion_concatenates_to_the_whole_answer(client):
    kw = dict(model="gen2", prompt="shares fell", max_tokens=8, temperature=0, stop=["zz"])
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "text_completion"


def test_seeded_sampling_is_reproducible_and_equals_native(client, native):
    kw = dict(model="gen", prompt="a new phone", max_tokens=8, temperature=1.0, top_p=0.9)
    texts = {s: client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)}
    assert client.completions.create(**kw, seed=2).choices[0].text == texts[2]
    ref = native.post("/v1/generate", json={"prompt": "gen", "text": "a new phone", "max_new_tokens": 8,
                                            "temperature": 1.0, "top_p": 0.9, "seed": 2}).json()
    assert texts[2] == ref["text"]
    assert len(set(texts.values())) > 1  # the seed reaches the sampler


def test_chat_renders_the_chat_template_behind_the_prompt(client, native, server):
    messages = [{"role": "user", "content": "the film won"}]
    out = client.chat.completions.create(model="gen", messages=messages, max_tokens=6, temperature=0)
    ref = native.post("/v1/generate", json={"prompt": "gen", "text": chat_text(server, "the film won"),
                                            "max_new_tokens": 6}).json()
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    ids = server.engine.bank.get("gen").spec.source_ids(server.engine.tokenizer, chat_text(server, "the film won"))
    assert out.usage.prompt_tokens == len(ids)
    # parts of text are one message
    parts = [{"role": "user", "content": [{"type": "text", "text": "the film "}, {"type": "text", "text": "won"}]}]
    assert client.chat.completions.create(model="gen", messages=parts, max_completion_tokens=6,
                                          temperature=0).choices[0].message.content == ref["text"]
    stream = list(client.chat.completions.create(model="gen", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref["text"]
    assert stream[-1].choices[0].finish_reason == choice.finish_reason


def test_classification_prompt_answers_its_label_and_probabilities(client, native):
    text = "a new phone with a faster chip"
    ref = native.post("/v1/classify", json={"prompt": "topic2", "text": text}).json()
    out = client.completions.create(model="topic2", prompt=text, logprobs=3)
    (choice,) = out.choices
    assert choice.text == ref["label"] and choice.finish_reason == "stop"
    top = choice.logprobs.top_logprobs[0]
    assert set(top) == set(ref["probs"])
    for label, p in ref["probs"].items():
        assert math.exp(top[label]) == pytest.approx(p, rel=1e-6, abs=1e-12)
    assert choice.logprobs.tokens == [ref["label"]] and out.softprompt["probs"] == pytest.approx(ref["probs"])
    assert client.completions.create(model="topic2", prompt=text).choices[0].logprobs is None
    chat = client.chat.completions.create(model="topic2", messages=[{"role": "user", "content": text}],
                                          logprobs=True, top_logprobs=2)
    lp = chat.choices[0].logprobs.content[0]
    assert chat.choices[0].message.content == ref["label"] and lp.token == ref["label"]
    assert [t.token for t in lp.top_logprobs] == sorted(ref["probs"], key=ref["probs"].get, reverse=True)[:2]
    assert math.exp(lp.logprob) == pytest.approx(ref["probs"][ref["label"]], rel=1e-6)
    chunks = list(client.chat.completions.create(model="topic2", messages=[{"role": "user", "content": text}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["label"]
    with pytest.raises(openai.BadRequestError) as e:  # a conversation is not one text to classify
        client.chat.completions.create(model="topic2", messages=[{"role": "system", "content": "x"},
                                                                 {"role": "user", "content": text}])
    assert e.value.param == "messages"


@pytest.mark.parametrize("kw, param", [
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True}, "echo"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"logprobs": 1}, "logprobs"),  # no token log-probabilities from generation
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_unsupported_fields_are_a_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "gen", "prompt": "x", **kw})
    assert e.value.param == param and e.value.message.startswith(f"Error code: 400 - {param}")
    assert e.value.type == "invalid_request_error"


def test_chat_refusals_and_a_model_without_a_chat_template(client, server, monkeypatch):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kw, param in [({"tools": tools}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="gen", messages=messages, **kw)
        assert e.value.param == param, kw
    # defaults a client may send are accepted
    client.chat.completions.create(model="gen", messages=messages, max_tokens=1, n=1, tool_choice="none",
                                   response_format={"type": "text"}, frequency_penalty=0, user="u")
    monkeypatch.setattr(server.engine.tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen", messages=messages, max_tokens=1)
    assert e.value.code == "no_chat_template" and "has no chat template" in e.value.message


def test_errors_take_openais_shape_only_on_openai_routes(client, native, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body == {"message": "the model 'nope' does not exist; see GET /v1/models",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.APIStatusError) as e:  # over --max-input-tokens: 413 naming the flag
        client.completions.create(model="gen", prompt="the " * 600)
    assert e.value.status_code == 413 and "--max-input-tokens" in e.value.message and e.value.param == "prompt"
    big = native.post("/v1/completions", json={"model": "gen", "prompt": "x" * 70_000})  # the guard's 413
    assert big.status_code == 413 and set(big.json()["error"]) == {"message", "type", "param", "code"}
    bad = native.post("/v1/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
    assert native.post("/v1/classify", json={"prompt": "nope", "text": "x"}).json() == {  # the native shape stays
        "error": {"type": "unknown_prompt", "message": "unknown prompt 'nope'; loaded: gen, gen2, sentiment, topic, topic2"}}


def test_api_key_and_overload(base, tmp_path):
    srv = serve(base, write_prompts(base, tmp_path / "p", ["gen"]), api_key="s3cret")
    try:
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert "missing or wrong API key" in e.value.message and e.value.type == "authentication_error"
        right = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model="gen", prompt="x", max_tokens=1).usage.completion_tokens <= 1
        srv.engine.stop()  # shutting down: 503 with Retry-After, as the native API answers
        with pytest.raises(openai.InternalServerError) as e:
            right.completions.create(model="gen", prompt="x", max_tokens=1)
        assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
        assert e.value.type == "server_error"
    finally:
        srv.stop()


def test_overload_and_timeouts_map_to_openais_statuses():
    """Queue full and timeouts keep the native statuses (429, 503) in OpenAI's shape (pure)."""
    for error, status, kind, code in [(QueueFullError("the queue is full (--max-queue 2)"), 429, "rate_limit_error", "queue_full"),
                                      (RequestTimeoutError("no answer"), 503, "server_error", "timeout"),
                                      (InvalidRequestError("the input text is empty"), 400, "invalid_request_error",
                                       "invalid_request")]:
        assert openai_error(error, "/v1/completions") == (status, {"error": {
            "message": str(error), "type": kind, "param": None, "code": code}})
    assert openai_error(InputTooLongError("long"), "/v1/chat/completions")[1]["error"]["param"] == "messages"


def test_readme_openai_example_runs(server, capsys):
    from docs_examples import page

    section = page("OpenAI-compatible API")
    (python,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "http://localhost:8000/v1" in python
    exec(compile(python.replace("http://localhost:8000/v1", server.url + "/v1"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "topic" in out and out.count("\n") >= 3
