"""The prompt store (#24): the folder indexed without reading files, prompts read on first use into
an LRU bounded in bytes, batched prefill of missing prefixes, namespaces, symlinks and traversal
refused, durable uploads, corrupt files failing only their prompt, /metrics."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.artifact import prompt_bytes, prompt_from_bytes
from softprompt.errors import ConfigError, PromptFileError
from softprompt.prefix import PrefixKV
from softprompt.serve import ClassifyRequest, Engine, EngineConfig
from softprompt.serve.store import check_name, namespace_of
from softprompt.serve.errors import BadPromptNameError, UnknownPromptError, UploadTooLargeError
from softprompt.serve.prefill import compute_prefixes, length_groups
from softprompt.serve.prefix_cache import MB, ByteLRU, default_limit_bytes, tensor_bytes
from softprompt.serve.store import PROMPT_PATTERN, PromptFolder
from test_serve_engine import TOPICS, soft_base

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


def weight(base, P=3, seed=0):
    return SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=seed).weight


def meta(base, P=3):
    return PromptMeta.for_base(base, P, task="classify", labels=TOPICS)


def write(base, folder, name, P=3, seed=0):
    path = folder.joinpath(*name.split("/")).with_name(name.rpartition("/")[2] + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_prompt(path, weight(base, P, seed), meta(base, P), dtype="float32")


def engine(base, folder, mb=None, wait_ms=0, **kw) -> Engine:
    return Engine(base, EngineConfig(max_wait_ms=wait_ms, prefix_cache_mb=mb), prompts_dir=folder, **kw)


def one_entry_mb(base, P=3) -> float:
    """MB of one resident classify prompt of P tokens on the tiny model (tensor + prefix)."""
    layers, heads, hd = base.kv_layout
    return (P * base.dim * 4 + layers * 2 * heads * P * hd * 4) / MB


# -- pure parts


def test_byte_lru_drops_least_recently_used_and_never_pinned():
    c = ByteLRU(10)
    c.put("a", 1, 4)
    c.put("b", 2, 4, pinned=True)
    assert c.get("a") == 1  # a is now most recent
    assert c.put("c", 3, 4) == ["a"]  # b is pinned: a goes although it was used last
    assert c.bytes == 8 and sorted(c.keys()) == ["b", "c"] and c.pinned_bytes == 4
    assert (c.stats.hits, c.stats.misses, c.stats.evictions) == (1, 0, 1)
    assert c.get("a") is None and c.stats.misses == 1
    c.put("c", 4, 2)  # a replacement frees exactly its old bytes
    assert c.bytes == 6 and c.peek("c") == 4
    c.pop("b")
    assert c.pinned_bytes == 0 and c.bytes == 2


def test_tensor_bytes_counts_shared_storage_once_and_default_limit():
    t = torch.zeros(4, 8)
    assert tensor_bytes(t, t[0], t[1:]) == 4 * 8 * 4
    assert default_limit_bytes(540 * MB, 8000 * MB) == 540 * MB  # the model's size
    assert default_limit_bytes(540 * MB, 1000 * MB) == 250 * MB  # a quarter of free memory
    assert default_limit_bytes(10 * MB, 100 * MB) == 64 * MB  # never below 64 MB


def test_names_and_namespaces():
    import re

    assert "(?=" not in PROMPT_PATTERN and "(?!" not in PROMPT_PATTERN and "(?<" not in PROMPT_PATTERN  # JSON-schema portable
    ok = ["t", "acme/ticket-routing", "a/b/c/d", "v1.2/x_y-z", "/".join(["x" * 128] * 4)]
    bad = ["", "/a", "a/", "a//b", "a/../b", "..", "a/b/c/d/e", ".hidden", "a/.b", "a\\b", "x" * 129, "a/" + "x" * 129]
    assert all(re.fullmatch(PROMPT_PATTERN.strip("^$"), n) for n in ok)
    for name in ok:
        PromptFolder("/tmp").path_of(name)
    folder = PromptFolder("/tmp")
    for name in bad:
        with pytest.raises(BadPromptNameError):
            folder.path_of(name)
    assert folder.path_of("acme/ticket-routing").as_posix() == "/tmp/acme/ticket-routing.safetensors"
    assert [namespace_of(n) for n in ("t", "acme/t", "a/b/c/d")] == ["", "acme", "a/b/c"]
    assert length_groups([3, 5, 3, 3, 1]) == [[0, 2, 3], [1], [4]]


def test_batched_prefill_equals_one_prompt_at_a_time(base):
    """One pass per length over U prompts == U passes of one (the same positions, full mask, no
    padding; only the order of float sums may differ: tolerance from fp32's epsilon times the
    depth of the sums, d per layer)."""
    from softprompt import PromptedModel

    pm = PromptedModel(base)
    prompts = [weight(base, P, seed) for seed, P in enumerate([3, 3, 5, 3, 5, 2])]
    batched = compute_prefixes(pm, prompts)
    layers, _, _ = base.kv_layout
    for p, got in zip(prompts, batched):
        want = PrefixKV.compute(pm, p)
        assert got.length == want.length == p.shape[0]
        for (k, v), (k0, v0) in zip(got.layers, want.layers):
            scale = max(1.0, float(k0.abs().max()), float(v0.abs().max()))
            tol = 4 * layers * base.dim * torch.finfo(torch.float32).eps * scale
            torch.testing.assert_close(k, k0, rtol=0, atol=tol)
            torch.testing.assert_close(v, v0, rtol=0, atol=tol)


# -- the store in an engine


def test_folder_is_indexed_without_reading_and_read_on_first_use(base, tmp_path):
    for i in range(4):
        write(base, tmp_path, f"p{i}", seed=i)
    (tmp_path / "zz-corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with engine(base, tmp_path) as eng:
        assert eng.bank.load_all(warm=0) == ["p0", "p1", "p2", "p3", "zz-corrupt"]  # the corrupt file is not read
        assert eng.bank.entries() == [] and eng.bank.stats().resident == 0
        r = eng.classify("hello", "p1")
        s = eng.bank.stats()
        assert (s.resident, s.misses, s.prefills) == (1, 1, 1) and r.label in TOPICS
        eng.classify("again", "p1")
        assert eng.bank.stats().hits >= 1 and eng.bank.stats().prefills == 1
        (tmp_path / "p2.safetensors").unlink()  # removed behind the server's back
        with pytest.raises(UnknownPromptError, match="no prompt file p2.safetensors"):
            eng.classify("x", "p2")
        assert "p2" not in eng.bank and len(eng.bank) == 4


def test_several_missing_prefixes_are_prefilled_in_one_pass(base, tmp_path, monkeypatch):
    for i, P in enumerate([3, 3, 3, 5]):
        write(base, tmp_path, f"p{i}", P=P, seed=i)
    with engine(base, tmp_path, wait_ms=2000) as eng:  # the first request waits for the others
        eng.bank.load_all(warm=0)
        ref = {}
        with engine(base, tmp_path) as alone:
            alone.bank.load_all(warm=0)
            for i in range(4):
                ref[f"p{i}"] = alone.classify("the match", f"p{i}").scores
        passes = []
        decode = eng.pm.decode
        monkeypatch.setattr(eng.pm, "decode", lambda *a, **k: (passes.append(a[0].shape), decode(*a, **k))[1])
        jobs = [eng.submit(ClassifyRequest("the match", [f"p{i}"])) for i in range(4)]  # one step
        results = [j.result(timeout=60) for j in jobs]
        prefill_passes = [s for s in passes if s[1] in (3, 5) and s[0] in (1, 3)][:2]
        assert sorted(tuple(s[:2]) for s in prefill_passes) == [(1, 5), (3, 3)]  # by length: 3 prompts of 3, 1 of 5
        assert eng.bank.stats().prefills == 4
        for i, r in enumerate(results):
            torch.testing.assert_close(torch.tensor(r.scores), torch.tensor(ref[f"p{i}"]), rtol=1e-4, atol=1e-4)


def test_lru_evicts_by_bytes_and_a_re_read_gives_the_same_scores(base, tmp_path):
    for i in range(5):
        write(base, tmp_path, f"p{i}", seed=i)
    with engine(base, tmp_path, mb=2.5 * one_entry_mb(base)) as eng:  # room for two
        eng.bank.load_all(warm=0)
        first = eng.classify("hello", "p0")
        for i in range(1, 5):
            eng.classify("hello", f"p{i}")
        s = eng.bank.stats()
        assert s.resident == 2 and s.evictions == 3 and s.bytes <= s.limit
        again = eng.classify("hello", "p0")  # evicted, read and prefilled again
        assert again.scores == first.scores and eng.bank.stats().prefills == 6


def test_an_admitted_request_keeps_its_entry_when_it_is_evicted(base, tmp_path):
    for i in range(3):
        write(base, tmp_path, f"p{i}", seed=i)
    with engine(base, tmp_path) as eng:
        eng.bank.load_all(warm=0)
        want = eng.classify("hello", "p0").scores
    with engine(base, tmp_path, mb=1.5 * one_entry_mb(base)) as eng:  # room for one
        eng.bank.load_all(warm=0)
        with eng.model_lock:  # the worker cannot run it yet
            job = eng.submit(ClassifyRequest("hello", ["p0"]))
            eng.bank.get("p1")  # p0 evicted before its prefix was even computed
            eng.bank.get("p2")
            (tmp_path / "p0.safetensors").unlink()  # and its file gone
            assert "p0" not in [e.name for e in eng.bank.entries()]
        assert job.result(timeout=60).scores == want


def test_corrupt_file_found_on_first_use_fails_only_that_prompt(base, tmp_path):
    write(base, tmp_path, "good")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with engine(base, tmp_path) as eng:
        eng.bank.load_all(warm=0)
        with pytest.raises(PromptFileError, match="bad.safetensors") as e:
            eng.classify("x", "bad")
        assert "\n" not in str(e.value)
        assert eng.classify("x", "good").label in TOPICS
        with pytest.raises(PromptFileError):  # still refused, the server still up
            eng.classify("x", "bad")
        assert eng.running


def test_symlinks_out_of_the_folder_and_traversal_are_refused(base, tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    outside = write(base, tmp_path, "outside")
    write(base, inside, "real")
    (inside / "alias.safetensors").symlink_to(inside / "real.safetensors")  # inside: followed
    with engine(base, inside) as eng:
        assert eng.bank.load_all() == ["alias", "real"]
        assert eng.classify("x", "alias").scores == eng.classify("x", "real").scores
    (inside / "evil.safetensors").symlink_to(outside)
    with pytest.raises(PromptFileError, match="symlink out of the prompts folder"):
        engine(base, inside).bank.load_all()
    (inside / "evil.safetensors").unlink()
    (inside / "ns").symlink_to(tmp_path, target_is_directory=True)  # a namespace folder leading out
    with engine(base, inside) as eng:
        assert eng.bank.load_all() == ["alias", "real"]  # not entered
        with pytest.raises(PromptFileError, match="out of the prompts folder"):
            eng.bank.load_file("ns/outside")
        with pytest.raises(BadPromptNameError):
            eng.bank.load_file("../outside")
        with pytest.raises(UnknownPromptError):
            eng.classify("x", "ns/outside")  # not indexed: unknown


def test_nested_folders_are_namespaces(base, tmp_path):
    write(base, tmp_path, "acme/ticket-routing", seed=1)
    write(base, tmp_path, "acme/support/triage", seed=2)
    write(base, tmp_path, "top", seed=3)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.safetensors").write_bytes(b"")  # hidden folders are skipped
    with engine(base, tmp_path) as eng:
        assert eng.bank.load_all() == ["acme/support/triage", "acme/ticket-routing", "top"]
        assert eng.classify("x", "acme/ticket-routing").prompts == ["acme/ticket-routing"]
    write(base, tmp_path, "a/b/c/d/too-deep")
    with pytest.raises(PromptFileError, match="too-deep.safetensors: the file's name is not a valid prompt name"):
        engine(base, tmp_path).bank.load_all()


def test_durable_uploads_survive_a_new_server_and_deletion_removes_the_file(base, tmp_path):
    data = prompt_bytes(weight(base, 4, seed=7), meta(base, 4), "float32")
    with engine(base, tmp_path, durable_uploads=True) as eng:
        eng.bank.load_all()
        assert eng.bank.load_bytes("acme/new", data).describe()["source"] == "upload"  # the HTTP answer as before
        before = eng.classify("hello", "acme/new").scores
    path = tmp_path / "acme" / "new.safetensors"
    assert path.read_bytes() == data and not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    with engine(base, tmp_path, durable_uploads=True) as eng:
        assert eng.bank.load_all() == ["acme/new"]
        assert eng.classify("hello", "acme/new").scores == before
        eng.bank.unload("acme/new")
        assert not path.exists() and "acme/new" not in eng.bank
    with engine(base, tmp_path) as eng:  # --ephemeral-uploads: nothing written
        eng.bank.load_bytes("mem", data)
    assert not (tmp_path / "mem.safetensors").exists()


def test_upload_replace_loop_keeps_resident_bytes_bounded(base, tmp_path):
    """10,000 uploads of 5 names (in memory; deep generation prompts of one token, which need no
    model pass, to keep it quick), then durable ones: resident bytes never pass the limit;
    in-memory uploads beyond it are refused."""
    from test_serve_deep import deep_meta, deep_tensor

    deep = [prompt_bytes(deep_tensor(base, 1, seed=s), deep_meta(base, 1, "generate"), "float32") for s in range(5)]
    datas = [prompt_bytes(weight(base, 1, seed=s), meta(base, 1), "float32") for s in range(5)]
    limit_mb = 8 * one_entry_mb(base, 1)
    with engine(base, tmp_path, mb=limit_mb) as eng:
        for i in range(10_000):
            eng.bank.load_bytes(f"u{i % 5}", deep[i % 7 % 5])
            assert eng.bank.stats().bytes <= eng.bank.stats().limit
        assert len(eng.bank) == 5
        with pytest.raises(UploadTooLargeError, match="--prefix-cache-mb"):
            for i in range(5, 20):
                eng.bank.load_bytes(f"u{i}", datas[0])  # pinned: the 9th cannot fit
    with engine(base, tmp_path, mb=limit_mb, durable_uploads=True) as eng:
        for i in range(300):
            eng.bank.load_bytes(f"d{i % 30}", datas[i % 5])  # on disk: evictable
            assert eng.bank.stats().bytes <= eng.bank.stats().limit
        assert len(eng.bank) == 30 and eng.bank.stats().resident <= 8


def test_cache_smaller_than_one_prefix_is_a_start_up_error(base, tmp_path):
    write(base, tmp_path, "p", P=8)
    with pytest.raises(ConfigError, match="--prefix-cache-mb is too small for the prompts folder: .*'p'"):
        engine(base, tmp_path, mb=0.5 * one_entry_mb(base, 8)).bank.load_all()
    with pytest.raises(ConfigError, match="smaller than the key/value prefix of a single virtual token"):
        engine(base, tmp_path, mb=1e-6)


def test_a_file_replaced_while_it_is_read_is_never_mixed(base, tmp_path):
    a = prompt_bytes(weight(base, 3, seed=1), meta(base, 3), "float32")
    b = prompt_bytes(weight(base, 6, seed=2), meta(base, 6), "float32")
    path = tmp_path / "p.safetensors"
    path.write_bytes(a)
    folder, stop = PromptFolder(tmp_path), threading.Event()

    def replace_forever():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".p.{i}.tmp"
            tmp.write_bytes(b if i % 2 else a)
            os.replace(tmp, path)
            i += 1

    t = threading.Thread(target=replace_forever)
    t.start()
    try:
        for _ in range(300):
            data = folder.read("p")
            assert data in (a, b)
            prompt_from_bytes(data)  # parses: one version, whole
    finally:
        stop.set()
        t.join()


def test_metrics_show_the_store(base, tmp_path):
    from prometheus_client import generate_latest

    write(base, tmp_path, "p")
    with engine(base, tmp_path) as eng:
        eng.bank.load_all(warm=0)
        eng.classify("x", "p")
        eng.classify("y", "p")
        text = generate_latest(eng.metrics.registry).decode()
        value = lambda name: eng.metrics.registry.get_sample_value(name)  # noqa: E731
        assert value("softprompt_prompts_resident") == 1 and value("softprompt_prefix_cache_bytes") > 0
        assert value("softprompt_prefix_cache_misses_total") == 1 and value("softprompt_prefix_cache_hits_total") >= 1
        assert value("softprompt_prefix_prefills_total") == 1 and value("softprompt_prefix_prefill_seconds_total") > 0
        for name in ("softprompt_prefix_cache_limit_bytes", "softprompt_prefix_cache_evictions_total",
                     "softprompt_prompt_load_seconds_total"):
            assert name in text


def test_over_http_a_corrupt_file_is_one_line_422_and_uploads_are_durable(base, tmp_path):
    """The store behind the HTTP routes: a namespaced name in a request body, a corrupt file found
    on first use (422 invalid_prompt_file, one line, the server still serving), an upload written
    to the folder (the same 201 answer as before) and removed by DELETE."""
    import httpx

    from softprompt.serve.config import ServeConfig
    from softprompt.serve.http import start_server

    write(base, tmp_path, "acme/good")
    (tmp_path / "acme" / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    config = ServeConfig(prompts_dir=str(tmp_path), port=0, engine=EngineConfig(max_wait_ms=0))
    eng = Engine(base, config.engine, prompts_dir=tmp_path, durable_uploads=not config.ephemeral_uploads)
    eng.bank.load_all(warm=0)
    srv = start_server(config, eng)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/classify", json={"prompt": "acme/bad", "text": "x"})
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_prompt_file"
            assert "bad.safetensors" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
            r = c.post("/v1/classify", json={"prompt": "acme/good", "text": "x"})
            assert r.status_code == 200 and r.json()["prompts"] == ["acme/good"]
            data = prompt_bytes(weight(base, 3, seed=5), meta(base, 3), "float32")
            r = c.put("/v1/prompts/uploaded", content=data)
            assert r.status_code == 201 and r.json()["source"] == "upload"
            assert (tmp_path / "uploaded.safetensors").read_bytes() == data
            assert c.delete("/v1/prompts/uploaded").status_code == 200
            assert not (tmp_path / "uploaded.safetensors").exists()
    finally:
        srv.stop()


def test_files_copied_in_after_start_up_are_used_and_unloaded_ones_are_not(base, tmp_path):
    write(base, tmp_path, "first")
    with engine(base, tmp_path) as eng:
        assert eng.bank.load_all() == ["first"]
        write(base, tmp_path, "acme/late", seed=1)  # an operator copies a file in
        assert eng.bank.available() == ["acme/late"]  # the listing sees it; "first" is resident
        late = eng.classify("x", "acme/late")
        eng.bank.unload("first")  # not durable: the file stays, the prompt is gone until loaded
        with pytest.raises(UnknownPromptError):
            eng.classify("x", "first")
        assert "first" not in eng.bank.available()
        eng.bank.load_file("first")
        assert eng.classify("x", "first").scores != late.scores


def test_training_run_folders_are_no_namespaces(base, tmp_path):
    """`softprompt train --out prompts/x.safetensors` writes prompts/x.run/ (checkpoints): the
    server must start on that folder (the README quickstart does exactly this)."""
    write(base, tmp_path, "tickets")
    run = tmp_path / "tickets.run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"not a prompt file")
    with engine(base, tmp_path) as eng:
        assert eng.bank.load_all() == ["tickets"]
        assert eng.bank.available() == []
    with pytest.raises(BadPromptNameError, match="may not end in '.run'"):
        check_name("tickets.run/x")
