"""The HTTP server, driven over loopback: concurrent mixed-task traffic, streaming, errors, limits,
auth, run-time prompt loading, metrics, and the ``softprompt serve`` command itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.errors import ConfigError
from softprompt.serve import ClassifyRequest, Engine, EngineConfig, GenerateRequest, ServeConfig
from softprompt.serve.http import start_server
from softprompt.cli import main

from test_serve_engine import PROMPTS, TEXTS, soft_base

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(base, folder: Path, names=tuple(PROMPTS)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        P, task, labels, verb = PROMPTS[name]
        w = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=P).weight
        save_prompt(folder / f"{name}.safetensors", w, PromptMeta.for_base(base, P, task=task, labels=labels, verbalizer=verb))
    return folder


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def prompts_dir(base, tmp_path_factory):
    return write_prompts(base, tmp_path_factory.mktemp("prompts"))


def serve(base, prompts_dir, **kw):
    engine_kw = {k: kw.pop(k) for k in list(kw) if k in EngineConfig.__dataclass_fields__}
    config = ServeConfig(prompts_dir=str(prompts_dir), port=0, engine=EngineConfig(**engine_kw), **kw)
    engine = Engine(base, config.engine, prompts_dir=prompts_dir)
    engine.bank.load_all()
    return start_server(config, engine)


@pytest.fixture(scope="module")
def server(base, prompts_dir):
    srv = serve(base, prompts_dir, max_wait_ms=5, max_upload_bytes=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_concurrent_mixed_traffic_matches_the_engine_alone(server):
    bodies = []
    for i, text in enumerate(TEXTS * 2):
        bodies += [
            ("/v1/classify", {"prompt": "topic", "text": text}),
            ("/v1/classify", {"prompt": ["topic", "topic2"], "text": text}),
            ("/v1/classify", {"prompt": "sentiment", "text": text}),
            ("/v1/classify", {"text": text, "labels": ["yes", "no"], "template": "Q: {text}\nA:"}),
            ("/v1/generate", {"prompt": "gen", "text": text, "max_new_tokens": 4 + i, "temperature": 1.0, "seed": i}),
            ("/v1/generate", {"prompt": "gen2", "text": text, "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.8, "seed": i}),
            ("/v1/generate", {"text": text, "max_new_tokens": 3, "stop": "x"}),
        ]

    def post(item):
        with httpx.Client(base_url=server.url, timeout=60) as c:  # one client per thread, like real users
            r = c.post(*item[:1], json=item[1])
            assert r.status_code == 200, r.text
            return r.json()

    rows = lambda: server.engine.metrics.registry.get_sample_value(  # noqa: E731
        "softprompt_batch_rows_sum", {"kind": "classify"}) or 0
    passes = lambda: server.engine.metrics.registry.get_sample_value(  # noqa: E731
        "softprompt_batch_rows_count", {"kind": "classify"}) or 0
    rows0, passes0 = rows(), passes()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(post, bodies))
    assert rows() - rows0 == 40 and passes() - passes0 < 40  # some rows shared a forward pass
    eng = server.engine
    for (route, body), answer in zip(bodies, got):  # the same engine, one request at a time
        if route == "/v1/classify":
            names = [body["prompt"]] if isinstance(body.get("prompt"), str) else body.get("prompt", [])
            ref = eng.submit(ClassifyRequest(body["text"], names, body.get("labels"), body.get("template"))).result()
            assert answer["label"] == ref.label and answer["prompts"] == ref.prompts
            torch.testing.assert_close(torch.tensor(answer["scores"]), torch.tensor(ref.scores), rtol=1e-4, atol=1e-4)
        else:
            stop = body.get("stop", [])
            ref = eng.submit(GenerateRequest(body["text"], body.get("prompt"), body["max_new_tokens"],
                                             body.get("temperature", 0.0), body.get("top_p", 1.0), body.get("seed"),
                                             [stop] if isinstance(stop, str) else stop)).result()
            assert answer == {"text": ref.text, "finish_reason": ref.finish_reason, "tokens": len(ref.token_ids),
                              "prompt": ref.prompt}


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_streaming_generation(client):
    body = {"prompt": "gen", "text": TEXTS[0], "max_new_tokens": 12, "temperature": 1.0, "seed": 3}
    plain = client.post("/v1/generate", json=body).json()
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"} and len(kinds) >= 2
    assert "".join(d["text"] for k, d in events if k == "token") == plain["text"] == events[-1][1]["text"]
    # a streamed request that cannot start is a plain JSON error
    r = client.post("/v1/generate", json={"prompt": "nope", "text": "x", "stream": True})
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_prompt"


def test_a_client_that_goes_away_frees_its_row(server, client):
    reg = server.engine.metrics.registry
    cancelled = lambda: reg.get_sample_value("softprompt_requests_total", {"kind": "generate", "outcome": "cancelled"}) or 0  # noqa: E731
    before = cancelled()
    body = {"prompt": "gen", "text": TEXTS[1], "max_new_tokens": 250, "temperature": 1.0, "seed": 0, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break
    for _ in range(500):  # the engine drops the row at its next step
        if cancelled() > before and reg.get_sample_value("softprompt_generation_rows") == 0:
            break
        time.sleep(0.01)
    assert cancelled() == before + 1 and reg.get_sample_value("softprompt_generation_rows") == 0
    assert client.post("/v1/generate", json={**body, "stream": False, "max_new_tokens": 3}).json()["tokens"] == 3


def test_batch_endpoints(client):
    reqs = [{"prompt": "topic", "text": t} for t in TEXTS]
    r = client.post("/v1/classify/batch", json={"requests": reqs})
    assert r.status_code == 200
    singles = [client.post("/v1/classify", json=b).json() for b in reqs]
    assert [x["label"] for x in r.json()["results"]] == [x["label"] for x in singles]
    gens = [{"prompt": "gen", "text": t, "max_new_tokens": 3} for t in TEXTS]
    r = client.post("/v1/generate/batch", json={"requests": gens})
    assert [x["tokens"] for x in r.json()["results"]] == [3] * len(TEXTS)
    r = client.post("/v1/classify/batch", json={"requests": reqs + [{"prompt": "gone", "text": "x"}]})
    assert r.status_code == 404 and "requests[4]" in r.json()["error"]["message"]
    r = client.post("/v1/generate/batch", json={"requests": [{**gens[0], "stream": True}]})
    assert r.status_code == 422
    assert client.post("/v1/classify/batch", json={"requests": []}).json() == {"results": []}


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, base, tiny_family, tmp_path):
    other = tiny_family("gpt2")
    w = SoftPrompt.initialize(other.embedding, other.tokenizer, 3, "vocab").weight
    foreign = save_prompt(tmp_path / "f.safetensors", w, PromptMeta.for_base(other, 3, task="classify", labels=["a", "b"]))
    cases = [
        (("POST", "/v1/classify"), {"json": {"prompt": "nope", "text": "x"}}, 404, "unknown_prompt", "nope"),
        (("POST", "/v1/classify"), {"json": {"prompt": "gen", "text": "x"}}, 422, "wrong_task", "generate prompt"),
        (("POST", "/v1/generate"), {"json": {"prompt": "topic", "text": "x"}}, 422, "wrong_task", "classify prompt"),
        (("POST", "/v1/classify"), {"json": {"prompt": "topic", "text": ""}}, 422, "invalid_request", "empty"),
        (("POST", "/v1/classify"), {"json": {"prompt": "topic", "text": "word " * 600}}, 413, "input_too_long", "--max-input-tokens"),
        (("POST", "/v1/classify"), {"content": b'{"prompt": "topic", "text": ', "headers": {"content-type": "application/json"}},
         400, "malformed_json", "malformed JSON"),
        (("POST", "/v1/classify"), {"json": {"prompt": "topic"}}, 422, "invalid_request", "text"),
        (("POST", "/v1/classify"), {"json": {"prompt": "topic", "text": "x", "colour": 1}}, 422, "invalid_request", "colour"),
        (("POST", "/v1/generate"), {"json": {"prompt": "gen", "text": "x", "max_new_tokens": 100000}}, 422, "invalid_request", "max_new_tokens"),
        (("POST", "/v1/classify"), {"json": {"prompt": ["topic", "sentiment"], "text": "x"}}, 422, "invalid_request", "same labels"),
        (("PUT", "/v1/prompts/foreign"), {"content": foreign.read_bytes()}, 422, "invalid_prompt_file", "fingerprint"),
        (("PUT", "/v1/prompts/junk"), {"content": b"not a prompt file at all"}, 422, "invalid_prompt_file", "junk"),
        (("PUT", "/v1/prompts/big"), {"content": b"\0" * (64 * 1024 + 1)}, 413, "too_large", "--max-upload-bytes"),
        (("PUT", "/v1/prompts/big"), {"content": iter([b"\0" * 40_000] * 2)}, 413, "too_large", "--max-upload-bytes"),  # chunked
        (("POST", "/v1/classify"), {"content": iter([b" " * 40_000] * 2), "headers": {"content-type": "application/json"}},
         413, "too_large", "--max-upload-bytes"),
        (("PUT", "/v1/prompts/.bad"), {"content": b"x"}, 400, "bad_prompt_name", "invalid prompt name"),
        # names may hold '/' (namespaces): a traversal reaches the route and is refused as a name
        (("POST", "/v1/prompts/..%2F..%2Fetc%2Fpasswd/load"), {}, 400, "bad_prompt_name", ""),
        (("POST", "/v1/prompts/..passwd/load"), {}, 400, "bad_prompt_name", ""),
        (("POST", "/v1/prompts/missing/load"), {}, 404, "unknown_prompt", "no prompt file"),
        (("DELETE", "/v1/prompts/missing"), {}, 404, "unknown_prompt", "missing"),
        (("GET", "/v1/nothing"), {}, 404, "not_found", ""),
    ]
    for (method, path), kw, status, kind, msg in cases:
        r = client.request(method, path, **kw)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == kind and msg in err["message"], (path, err)
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/classify", json={"prompt": "topic", "text": "fine"}).status_code == 200
    assert "foreign" not in [p["name"] for p in client.get("/v1/prompts").json()["prompts"]]


def test_load_and_unload_while_serving(server, client, base, prompts_dir, tmp_path):
    stop = threading.Event()
    statuses: list[int] = []

    def traffic():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set() and len(statuses) < 500:
                statuses.append(c.post("/v1/classify", json={"prompt": "topic", "text": "shares fell"}).status_code)

    t = threading.Thread(target=traffic)
    t.start()
    deadline = time.monotonic() + 60
    while not statuses and time.monotonic() < deadline:  # the traffic is flowing before the changes start
        time.sleep(0.01)
    try:
        data = (prompts_dir / "sentiment.safetensors").read_bytes()
        r = client.put("/v1/prompts/uploaded", content=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201 and r.json()["source"] == "upload"
        assert client.post("/v1/classify", json={"prompt": "uploaded", "text": "great"}).json()["label"] in ("positive", "negative")
        shutil.copy(prompts_dir / "gen.safetensors", prompts_dir / "late.safetensors")
        try:
            assert "late" in client.get("/v1/prompts").json()["available"]
            assert client.post("/v1/prompts/late/load").json()["task"] == "generate"
            assert client.post("/v1/generate", json={"prompt": "late", "text": "x", "max_new_tokens": 2}).status_code == 200
        finally:
            (prompts_dir / "late.safetensors").unlink()
        for name in ("uploaded", "late"):
            assert client.delete(f"/v1/prompts/{name}").status_code == 200
            assert client.post("/v1/classify", json={"prompt": name, "text": "x"}).status_code == 404
        assert client.get("/v1/prompts/topic").json()["length"] == PROMPTS["topic"][0]
    finally:
        stop.set()
        t.join(60)
    assert statuses and set(statuses) == {200}


def test_full_queue_429_slow_request_503_and_recovery(base, prompts_dir):
    srv = serve(base, prompts_dir, max_wait_ms=0, max_queue=2, max_batch=2, max_ensemble=2, request_timeout=0.5)
    try:
        with ThreadPoolExecutor(8) as pool:
            post = lambda i: pool.submit(httpx.post, srv.url + "/v1/classify",  # noqa: E731
                                         json={"prompt": "topic", "text": f"t{i}"}, timeout=30)
            taken = lambda: srv.engine.metrics.registry.get_sample_value(  # noqa: E731
                "softprompt_queue_wait_seconds_count", {"kind": "classify"}) or 0
            with srv.engine.model_lock:  # the engine stalls on its first batch
                futs = [post(0)]
                for _ in range(500):
                    if taken():
                        break
                    time.sleep(0.01)
                futs += [post(i) for i in range(1, 8)]  # 2 wait in the queue, 5 find it full
                # wait for the 5 refusals and the 2 queued (a fixed sleep raced a loaded machine), then
                # past --request-timeout
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not (
                        sum(f.done() for f in futs) >= 5 and srv.engine.queue_depth >= 2):
                    time.sleep(0.01)
                time.sleep(0.6)
            for f in futs:
                f.result()
        codes = sorted(f.result().status_code for f in futs)
        bodies = [f.result().json() for f in futs]
        assert codes == [429, 429, 429, 429, 429, 503, 503, 503], codes  # the running one timed out too
        assert all(b["error"]["type"] in ("queue_full", "timeout") for b in bodies if "error" in b)
        assert any("--max-queue 2" in b["error"]["message"] for b in bodies if "error" in b)
        assert httpx.post(srv.url + "/v1/classify", json={"prompt": "topic", "text": "ok"}).status_code == 200
        text = httpx.get(srv.url + "/metrics").text
        assert re.search(r'softprompt_requests_total\{kind="classify",outcome="queue_full"\} [1-9]', text)
        assert re.search(r'softprompt_requests_total\{kind="classify",outcome="timeout"\} [1-9]', text)
    finally:
        srv.stop()


def test_api_key_is_required_on_every_request(base, prompts_dir):
    srv = serve(base, prompts_dir, api_key="s3cret")
    try:
        for path in ("/healthz", "/metrics", "/v1/prompts", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 401
        r = httpx.post(srv.url + "/v1/classify", json={"prompt": "topic", "text": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert httpx.get(srv.url + "/healthz", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.post(srv.url + "/v1/classify", json={"prompt": "topic", "text": "x"},
                          headers={"X-API-Key": "s3cret"}).status_code == 200
    finally:
        srv.stop()


def test_metrics_health_and_openapi(client):
    client.post("/v1/classify", json={"prompt": "topic", "text": "x"})
    text = client.get("/metrics").text
    for name in ("softprompt_requests_total", "softprompt_batch_rows_bucket", "softprompt_queue_depth",
                 "softprompt_request_latency_seconds_bucket", "softprompt_http_requests_total", "softprompt_prompts_loaded"):
        assert name in text
    assert 'route="/v1/classify"' in text
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["prompts"] >= len(PROMPTS)
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/classify", "/v1/classify/batch", "/v1/generate", "/v1/generate/batch", "/v1/prompts/{name}",
              "/v1/prompts/{name}/load", "/healthz", "/metrics"):
        assert p in paths


def test_config_is_validated_up_front(tmp_path, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="--host 0.0.0.0 is not a loopback address"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    assert ServeConfig(host="::").api_key == "from-env"
    monkeypatch.delenv("SOFTPROMPT_API_KEY")
    assert ServeConfig(host="::1").api_key is None and ServeConfig(host="localhost").host == "localhost"
    for kw, flag in [({"port": 70000}, "--port"), ({"prompts_dir": str(tmp_path / "no")}, "--prompts"),
                     ({"api_key": " "}, "--api-key"), ({"max_upload_bytes": 0}, "--max-upload-bytes"),
                     ({"threads": 0}, "--threads"), ({"dtype": "int8"}, "--dtype")]:
        with pytest.raises(ConfigError, match=flag):
            ServeConfig(**kw)
    for kw, flag in [({"max_batch": 0}, "--max-batch"), ({"max_wait_ms": -1}, "--max-wait-ms"),
                     ({"request_timeout": 0}, "--request-timeout"), ({"max_queue": 0}, "--max-queue"),
                     ({"max_input_tokens": 0}, "--max-input-tokens"), ({"max_ensemble": 99}, "--max-ensemble")]:
        with pytest.raises(ConfigError, match=flag):
            EngineConfig(**kw)


def test_cli_refuses_bad_flags_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err
    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_serve_command_end_to_end(tiny_dir, tiny, tmp_path):
    """`softprompt serve` as users run it: a subprocess on a free loopback port."""
    write_prompts(tiny, tmp_path / "p", ["topic", "gen"])
    env = {**os.environ, "SOFTPROMPT_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "softprompt", "serve", "--prompts", str(tmp_path / "p"), "--model", str(tiny_dir),
           "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=ROOT, text=True)
    try:
        line = proc.stderr.readline()  # "serving 2 prompt(s) on ... at http://127.0.0.1:PORT; ..."
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        for _ in range(200):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        r = httpx.post(url + "/v1/classify", json={"prompt": "topic", "text": "shares fell"})
        assert r.status_code == 200 and r.json()["label"] in PROMPTS["topic"][2]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("path,body", [("/v1/classify", {"text": TEXTS[0]}),
                                       ("/v1/completions", {"prompt": TEXTS[0]})])
def test_a_prompt_is_read_and_a_request_prepared_off_the_event_loop(server, client, monkeypatch, path, body):
    """A miss reads its file during admission: that must not stall the event loop serving every
    other connection, so admission runs in a worker thread (no running loop there), on the native
    and the OpenAI routes."""
    import asyncio

    bank, seen = server.engine.bank, []
    get = bank.get

    def recording_get(name):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return get(name)
    monkeypatch.setattr(bank, "get", recording_get)
    name = next(n for n, spec in PROMPTS.items() if spec[1] == "classify")
    r = client.post(path, json={("model" if path.startswith("/v1/completions") else "prompt"): name, **body})
    assert r.status_code == 200, r.text
    assert seen and set(seen) == {"worker thread"}
