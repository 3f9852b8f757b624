"""Namespaces and scoped API keys (``--api-keys``): the key file's checks, the scoping rules, and a
live server on which a key of one namespace tries every route, native and OpenAI, on another's
prompt. Routes are read from the app, so a new route is tried without a line here."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.artifact import prompt_bytes
from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.serve import ServeConfig
from softprompt.serve.store import SUFFIX
from softprompt.serve.keys import KeyRing, Scope, digest, load_keys
from softprompt.serve.store import namespace_of

from test_serve_engine import PROMPTS, soft_base
from test_serve_http import serve, write_prompts

ADMIN_KEY = "root-secret-0"
KEYS = {"acme-app": "acme-secret-1", "acme-reader": "acme-reader-2", "globex": "globex-secret-3", "top": "top-secret-4"}
KEY_FILE = f"""
# acme's application: uses and writes its own prompts
[[keys]]
name = "acme-app"
key = "{KEYS['acme-app']}"
write = ["acme"]

[[keys]]
name = "acme-reader"
key = "{KEYS['acme-reader']}"
use = ["acme"]

[[keys]]
name = "globex"
key = "{KEYS['globex']}"
write = ["globex/**"]

[[keys]]
name = "top"
key = "{KEYS['top']}"
use = [""]
"""
NAMESPACED = {"acme/topic": "topic", "acme/gen": "gen", "globex/topic": "topic", "globex/gen": "gen",
              "globex/team/gen": "gen"}
"""Prompts added to the server in namespaces: name -> the PROMPTS entry it is made like."""
SECRETS = [ADMIN_KEY, *KEYS.values()]


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {ADMIN_KEY if who == 'admin' else KEYS[who]}"}


def prompt_of(base, like: str):
    P, task, labels, verb = PROMPTS[like]
    w = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=P).weight
    return w, PromptMeta.for_base(base, P, task=task, labels=labels, verbalizer=verb)


# ----------------------------------------------------------------------------- the key file

def write(tmp_path: Path, text: str, name: str = "keys.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, problem", [
    ('[[keys]]\nkey = "k1"\nuse = ["acme"\n', "not valid TOML"),
    ('[[keys]]\nkey = "k1"\nuse = ["acme"]\ncolour = 1\n', "unknown field 'colour'"),
    ('[[keys]]\nkey = "k1"\n[[keys]]\nname = "again"\nkey = "k1"\n', "keys[1] has the same key as keys[0]"),
    ('[[keys]]\nkey = ""\n', "keys[0].key is empty"),
    ('[[keys]]\nkey = "k 1"\n', "without spaces"),
    ('[[keys]]\nuse = ["acme"]\n', "give key or sha256"),
    ('[[keys]]\nkey = "k1"\nsha256 = "00"\n', "give key or sha256"),
    ('[[keys]]\nsha256 = "abc"\n', "64 hexadecimal digits"),
    ('[[keys]]\nkey = "k1"\nuse = ["../etc"]\n', "no namespace pattern"),
    ('[[keys]]\nkey = "k1"\nuse = ["a/b/c/d"]\n', "more than 3 namespace levels"),
    ('[[keys]]\nkey = "k1"\nuse = "acme"\n', "keys[0].use must be a list"),
    ('[[keys]]\nkey = "k1"\nadmin = "yes"\n', "keys[0].admin must be true or false"),
    ('[[keys]]\nkey = "k1"\nadmin = true\nuse = ["acme"]\n', "drop its use and write"),
    ('[[keys]]\nkey = "root-secret-0"\n', "keys[0] is the --api-key"),
    ('keys = []\n', "no keys"),
    ('[[key]]\nkey = "k1"\n', "unknown field 'key'"),
])
def test_a_bad_key_file_is_one_line_naming_file_and_problem_never_the_key(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        ServeConfig(api_key=ADMIN_KEY, api_keys=str(path))
    message = str(e.value)
    assert message.startswith(f"--api-keys {path}: ") and problem in message and "\n" not in message
    assert not any(k in message for k in ("k1", "k 1", ADMIN_KEY))


def test_syntax_errors_name_their_line_in_toml_and_json(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 3"):
        load_keys(write(tmp_path, '[[keys]]\nkey = "k1"\nuse = [acme]\n'))
    with pytest.raises(ConfigError, match=r"not valid JSON: .*line 2"):
        load_keys(write(tmp_path, '{"keys": [\n{"key": "k1",}]}', "keys.json"))
    with pytest.raises(ConfigError, match="cannot read it"):
        load_keys(tmp_path / "missing.toml")


def test_json_and_toml_files_say_the_same(tmp_path):
    data = {"keys": [{"name": "a", "key": "k1", "use": ["acme/**"], "write": ["acme/drafts"]},
                     {"sha256": digest("k2").hex(), "admin": True}]}
    toml = ('[[keys]]\nname = "a"\nkey = "k1"\nuse = ["acme/**"]\nwrite = ["acme/drafts"]\n'
            f'[[keys]]\nsha256 = "{digest("k2").hex()}"\nadmin = true\n')
    from_json = load_keys(write(tmp_path, json.dumps(data), "keys.json"))
    assert from_json == load_keys(write(tmp_path, toml))
    assert from_json[digest("k2")].admin and from_json[digest("k1")].label == "a"


def test_scopes_and_grants(tmp_path):
    assert [namespace_of(n) for n in ("x", "acme/x", "acme/team/x")] == ["", "acme", "acme/team"]
    acme, tree, top, every = (Scope.parse(p) for p in ("acme", "acme/**", "", "**"))
    assert acme.covers("acme") and not acme.covers("acme/team") and not acme.covers("acmex")
    assert tree.covers("acme") and tree.covers("acme/team") and not tree.covers("acmex") and not tree.covers("")
    assert top.covers("") and not top.covers("acme")
    assert every.covers("") and every.covers("a/b/c")
    keys = load_keys(write(tmp_path, KEY_FILE))
    app, reader = keys[digest(KEYS["acme-app"])], keys[digest(KEYS["acme-reader"])]
    assert app.may_write("acme/x") and app.may_use("acme/x") and not app.may_use("acme/team/x")
    assert reader.may_use("acme/x") and not reader.may_write("acme/x") and not reader.may_use("globex/x")
    assert not keys[digest(KEYS["top"])].may_use("acme/x") and keys[digest(KEYS["top"])].may_use("x")
    assert keys[digest(KEYS["globex"])].may_write("globex/team/x")


def test_api_keys_alone_may_serve_beyond_loopback_and_the_cli_refuses_a_bad_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    path = write(tmp_path, KEY_FILE)
    assert ServeConfig(host="0.0.0.0", api_keys=str(path)).api_keys == str(path)
    bad = write(tmp_path, '[[keys]]\nkey = "k1"\nuse = [acme]\n', "bad.toml")
    assert main(["serve", "--api-keys", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--api-keys {bad}" in err and "line" in err


# ----------------------------------------------------------------------------- reload

def test_a_change_swaps_the_keys_and_a_broken_file_keeps_the_old_ones(tmp_path, caplog):
    path = write(tmp_path, '[[keys]]\nkey = "first-key"\nuse = ["acme"]\n')
    ring = KeyRing(ADMIN_KEY, path, poll_s=0)
    assert ring.grant("first-key").may_use("acme/x") and ring.grant(ADMIN_KEY).admin
    assert ring.grant("second-key") is None

    def rewrite(text: str) -> None:
        seen = path.stat().st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(seen + 10**9, seen + 10**9))  # a new mtime even on a coarse clock

    rewrite('[[keys]]\nkey = "second-key"\nuse = ["globex"]\n')
    assert ring.grant("second-key").may_use("globex/x") and ring.grant("first-key") is None
    with caplog.at_level(logging.DEBUG):
        rewrite('[[keys]]\nkey = "third-key"\nuse = ["globex"\n')  # a syntax error
        assert ring.grant("third-key") is None and ring.grant("second-key") is not None
        assert ring.grant("second-key") is not None  # logged once, not on every look-up
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0].getMessage() and "keeping the 1 key(s)" in errors[0].getMessage()
    assert not any(k in caplog.text for k in ("first-key", "second-key", "third-key", ADMIN_KEY))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads(tmp_path):
    path = write(tmp_path, '[[keys]]\nkey = "first-key"\nuse = ["acme"]\n')
    ring = KeyRing(None, path, poll_s=3600)  # only the signal reloads
    previous = ring.reload_on_sighup()
    try:
        path.write_text('[[keys]]\nkey = "second-key"\nuse = ["acme"]\n')
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while ring.grant("second-key") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.grant("second-key") is not None and ring.grant("first-key") is None
    finally:
        signal.signal(signal.SIGHUP, previous)


# ----------------------------------------------------------------------------- a live server

@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    folder = write_prompts(base, tmp_path_factory.mktemp("prompts"))  # top-level: topic, gen, ...
    for name, like in NAMESPACED.items():  # files too, for POST /v1/prompts/{name}/load
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_prompt(folder / f"{name}{SUFFIX}", *prompt_of(base, like))
    key_file = write(tmp_path_factory.mktemp("keys"), KEY_FILE)
    srv = serve(base, folder, api_key=ADMIN_KEY, api_keys=str(key_file), max_wait_ms=2, max_upload_bytes=64 * 1024)
    restore(srv, base)
    yield srv
    srv.stop()


def restore(srv, base) -> None:
    """Every namespaced prompt loaded, as at the start."""
    for name, like in NAMESPACED.items():
        if name not in srv.engine.bank:
            srv.engine.bank.add_tensor(name, *prompt_of(base, like))


def app_of(srv):
    return srv.server.config.app


def body_for(route, target: str) -> dict | None:
    """A valid JSON body for ``route`` that names ``target`` wherever a body names a prompt (None:
    the route takes no JSON body); fails on a required field this test does not know."""
    field = getattr(route, "body_field", None)
    if field is None:
        return None
    values = {"text": "hello", "prompt": target, "model": target,
              "messages": [{"role": "user", "content": "hello"}],
              "requests": [{"prompt": target, "text": "hello"}], "max_tokens": 2, "max_new_tokens": 2}
    body = {}
    for name, info in field.field_info.annotation.model_fields.items():
        if name in values and (info.is_required() or name in ("prompt", "model", "requests", "max_tokens",
                                                                "max_new_tokens")):
            body[name] = values[name]
        else:
            assert not info.is_required(), f"{route.path}: give this test a value for the body field {name!r}"
    return body


def requests_of(srv, base, target: str):
    """(method, path, kwargs, names_a_prompt) of every route of the app, aimed at ``target``."""
    for route in app_of(srv).routes:
        params = set(getattr(route, "param_convertors", {}))
        assert params <= {"name", "model"}, f"{route.path}: a path parameter access.py does not check"
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            kw: dict = {}
            gen_target = target.replace("topic", "gen") if "/generate" in route.path else target
            body = body_for(route, gen_target)
            if method == "PUT":
                kw["content"] = prompt_bytes(*prompt_of(base, "topic"), "float32")
            elif body is not None:
                kw["json"] = body
            path = route.path_format.format(**{p: gen_target for p in params})
            yield method, path, kw, bool(params) or body is not None


def test_a_key_never_reaches_another_namespaces_prompt_through_any_route(server, base):
    bank_ = server.engine.bank
    before = {n: bank_.get(n) for n in NAMESPACED}
    tried = 0
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for (method, path, kw, named), (_, path_none, kw_none, _) in zip(
                requests_of(server, base, "globex/topic"), requests_of(server, base, "globex/nothing")):
            r = c.request(method, path, headers=auth("acme-app"), **kw)
            assert "globex/team" not in r.text, (method, path, r.text)  # a prompt no request names
            if not named:  # listings, health, docs, metrics: nothing of globex
                assert "globex" not in r.text and r.status_code in (200, 403), (method, path, r.text)
                continue
            tried += 1
            assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
            # the answer is the one for a prompt that does not exist: it tells nothing
            none = c.request(method, path_none, headers=auth("acme-app"), **kw_none)
            assert (r.status_code, r.text.replace("globex/gen", "X").replace("globex/topic", "X")) == (
                none.status_code, none.text.replace("globex/nothing", "X")), (method, path)
        assert {n: bank_.get(n) for n in NAMESPACED} == before  # nothing replaced or unloaded
        assert tried >= 11  # 4 inference, 4 on /v1/prompts/{name}, 3 OpenAI
        for method, path, kw, named in requests_of(server, base, "globex/topic"):  # the same requests work for admin
            r = c.request(method, path, headers=auth("admin"), **kw)
            assert r.status_code < 300, (method, path, r.text)
            restore(server, base)


def test_listings_hold_only_what_the_key_may_use(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def seen(who):
            prompts = {p["name"] for p in c.get("/v1/prompts", headers=auth(who)).json()["prompts"]}
            models = {m["id"] for m in c.get("/v1/models", headers=auth(who)).json()["data"]}
            assert models - prompts == {server.engine.pm.base.name}
            assert c.get("/healthz", headers=auth(who)).json()["prompts"] == len(prompts)
            return prompts

        top = set(PROMPTS)
        assert seen("admin") >= top | set(NAMESPACED)
        assert seen("acme-app") == seen("acme-reader") == {"acme/topic", "acme/gen"}
        assert seen("globex") == {"globex/topic", "globex/gen", "globex/team/gen"}
        assert seen("top") == top
        assert c.get("/metrics", headers=auth("admin")).status_code == 200
        m = c.get("/metrics", headers=auth("top"))
        assert m.status_code == 403 and m.json()["error"]["type"] == "forbidden"
        assert c.get("/openapi.json", headers=auth("top")).status_code == 200
        assert c.get("/healthz").status_code == 401


def test_writes_need_write_and_uses_need_use(server, base):
    data = prompt_bytes(*prompt_of(base, "topic"), "float32")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.put("/v1/prompts/acme/topic", content=data, headers=auth("acme-reader"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden" and "'acme'" in r.json()["error"]["message"]
        assert c.delete("/v1/prompts/acme/gen", headers=auth("acme-reader")).status_code == 403
        ok = c.post("/v1/classify", json={"prompt": "acme/topic", "text": "hi"}, headers=auth("acme-reader"))
        assert ok.status_code == 200 and ok.json()["prompts"] == ["acme/topic"]
        assert c.put("/v1/prompts/acme/new", content=data, headers=auth("acme-app")).status_code == 201
        assert c.get("/v1/prompts/acme/new", headers=auth("acme-reader")).json()["source"] == "upload"
        assert c.put("/v1/prompts/acme/team/x", content=data, headers=auth("acme-app")).status_code == 403
        assert c.put("/v1/prompts/globex/team/new", content=data, headers=auth("globex")).status_code == 201
        missing = c.delete("/v1/prompts/acme/missing", headers=auth("acme-app"))
        assert missing.status_code == 404 and "globex" not in missing.text and "acme/new" in missing.text
        assert c.delete("/v1/prompts/acme/new", headers=auth("acme-app")).json() == {"unloaded": "acme/new"}
        ensemble = c.post("/v1/classify", json={"prompt": ["acme/topic", "globex/topic"], "text": "hi"},
                          headers=auth("acme-app"))
        assert ensemble.status_code == 404 and "'globex/topic'" in ensemble.text and "globex/gen" not in ensemble.text
        chat = c.post("/v1/chat/completions", json={"model": "globex/topic", "messages": [{"role": "user", "content": "x"}]},
                      headers=auth("acme-app"))
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
        bare = c.post("/v1/generate", json={"text": "hi", "max_new_tokens": 2}, headers=auth("top"))
        assert bare.status_code == 200  # the base model is every key's
    server.engine.bank.unload("globex/team/new")


def test_reload_on_the_live_server_and_keys_never_logged_or_answered(server, caplog):
    ring = app_of(server).state.keys
    path = ring.path
    old = path.read_text()
    answers = []
    try:
        with caplog.at_level(logging.DEBUG), httpx.Client(base_url=server.url, timeout=60) as c:
            answers.append(c.get("/v1/prompts", headers={"Authorization": "Bearer new-key-5"}))
            assert answers[-1].status_code == 401
            path.write_text(old + '\n[[keys]]\nkey = "new-key-5"\nuse = ["globex"]\n')
            assert ring.reload()
            answers.append(c.get("/v1/prompts", headers={"Authorization": "Bearer new-key-5"}))
            assert {p["name"] for p in answers[-1].json()["prompts"]} == {"globex/topic", "globex/gen"}
            path.write_text("[[keys]\n")
            assert not ring.reload()  # broken: the keys stay
            answers.append(c.get("/v1/prompts", headers={"Authorization": "Bearer new-key-5"}))
            assert answers[-1].status_code == 200
            for who in ("admin", *KEYS):
                answers.append(c.post("/v1/classify", json={"prompt": "globex/topic", "text": "x"}, headers=auth(who)))
            answers.append(c.get("/v1/models", headers={"X-API-Key": "wrong-key-6"}))
    finally:
        path.write_text(old)
        ring.reload()
    texts = [caplog.text] + [a.text + str(a.headers) for a in answers]
    for secret in (*SECRETS, "new-key-5", "wrong-key-6"):
        assert not any(secret in t for t in texts), secret


def test_listing_page_is_sorted_filtered_and_chains_by_cursor():
    from softprompt.serve.store import listing_page

    names = ["b", "acme/x", "acme/sub/y", "a", "acmex/z", "globex/q"]
    assert listing_page(names) == (sorted(names), None)
    assert listing_page(names, namespace="acme") == (["acme/sub/y", "acme/x"], None)  # not acmex/
    seen, after = [], None
    while True:
        page, after = listing_page(names, after=after, limit=4)
        seen += page
        if after is None:
            break
        assert len(page) == 4
    assert seen == sorted(names)
    assert listing_page(names, after="acme/x", limit=2) == (["acmex/z", "b"], "b")
    assert listing_page(names, after="b", limit=2) == (["globex/q"], None)


def test_pages_of_the_listing_hold_only_what_the_key_may_use(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def pages(who, **params):
            names, after = [], None
            while True:
                body = c.get("/v1/prompts", headers=auth(who), params={**params, "limit": 1,
                                                                     **({"after": after} if after else {})}).json()
                got = [p["name"] for p in body["prompts"]] + body["available"]
                assert len(got) <= 1
                names += got
                after = body["next"]
                if after is None:
                    return names
        everything = c.get("/v1/prompts", headers=auth("admin")).json()
        assert everything["next"] is None
        assert pages("admin") == sorted([p["name"] for p in everything["prompts"]] + everything["available"])
        assert pages("globex") == ["globex/gen", "globex/team/gen", "globex/topic"]  # the cursor never names acme's
        assert pages("admin", namespace="globex/team") == ["globex/team/gen"]
        assert pages("acme-app", namespace="globex") == []
        for bad in ({"limit": 0}, {"limit": 10_001}, {"namespace": "../x"}):
            r = c.get("/v1/prompts", headers=auth("admin"), params=bad)
            assert r.status_code == 422, bad
        message = c.get("/v1/prompts", headers=auth("admin"), params={"namespace": "../x"}).json()["error"]["message"]
        assert message.startswith("namespace: not a prompt name or namespace: 1-4 segments") and "\n" not in message
