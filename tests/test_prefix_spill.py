"""The prefix spill (#24): computed input-prompt prefixes kept on disk under the in-memory cache.
Read back bit for bit; a hit skips the prefill and answers as a freshly computed prefix does; a
replaced prompt or another model never finds an old prefix; bounded in bytes; bad files, a folder
that cannot be written and a full queue never stop serving."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from softprompt import PromptedModel, PromptMeta, wrap_base_model
from softprompt.errors import ConfigError
from softprompt.serve import Engine, EngineConfig, ServeConfig
from softprompt.serve.prefill import PrefixSlot, compute_prefixes
from softprompt.serve.prefix_cache import MB
from softprompt.serve.prefix_spill import (
    NoSpill, PrefixSpill, SpillFileError, model_digest, prefix_bytes, prefix_from_bytes, prefix_key,
)
from test_serve_engine import TOPICS, soft_base
from test_store import one_entry_mb, weight, write

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


@pytest.fixture(scope="module")
def pm(base):
    return PromptedModel(base)


def spill_engine(base, folder, spill_dir, *, mb=None, spill_mb=4.0) -> Engine:
    config = EngineConfig(max_wait_ms=0, prefix_cache_mb=mb, prefix_spill_mb=spill_mb,
                          prefix_spill_dir=None if spill_dir is None else str(spill_dir))
    return Engine(base, config, prompts_dir=folder)


def assert_same_prefix(got, want):
    assert got.length == want.length and len(got.layers) == len(want.layers)
    for (k, v), (k0, v0) in zip(got.layers, want.layers):
        assert k.dtype == k0.dtype and torch.equal(k, k0) and torch.equal(v, v0)


def spilled(spill: PrefixSpill) -> list:
    return sorted(spill.dir.glob("*.safetensors"))


# -- the store on its own


def test_a_prefix_read_back_is_bit_identical(pm, base, tmp_path):
    prompt = weight(base, P=4, seed=1)
    want = compute_prefixes(pm, [prompt])[0]
    key = prefix_key(model_digest(pm), prompt)
    assert_same_prefix(prefix_from_bytes(prefix_bytes(key, want), key, 4, base.device), want)
    spill = PrefixSpill(tmp_path, MB, model_digest(pm), base.device)
    assert spill.put(key, want)
    assert_same_prefix(spill.get(key, 4), want)
    with pytest.raises(SpillFileError, match="another prefix"):  # the file of one key never serves another
        prefix_from_bytes(prefix_bytes(key, want), "0" * 64, 4, base.device)


def test_the_key_changes_with_the_prompt_and_the_model(pm, base):
    prompt = weight(base, P=3, seed=0)
    digest = model_digest(pm)
    assert prefix_key(digest, prompt) == prefix_key(digest, prompt.clone())
    assert prefix_key(digest, prompt) != prefix_key(digest, prompt + 1e-6)  # one value moved
    assert prefix_key(digest, prompt) != prefix_key(digest, prompt.double())  # another dtype
    assert prefix_key(digest, prompt) != prefix_key(digest, prompt.reshape(1, *prompt.shape))
    # the same embeddings (the same fingerprint) with one layer's weights changed: another model
    other = copy.deepcopy(base.model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "layers.0" in n).add_(1e-3)
    other_base = wrap_base_model(other, base.tokenizer, base.name)
    assert other_base.fingerprint == base.fingerprint and model_digest(PromptedModel(other_base)) != digest
    assert model_digest(PromptedModel(wrap_base_model(copy.deepcopy(base.model).to(torch.bfloat16),
                                                      base.tokenizer, base.name))) != digest


def test_the_byte_bound_deletes_the_least_recently_used(pm, base, tmp_path):
    prompts = [weight(base, P=3, seed=s) for s in range(4)]
    prefixes = compute_prefixes(pm, prompts)
    digest = model_digest(pm)
    keys = [prefix_key(digest, p) for p in prompts]
    size = len(prefix_bytes(keys[0], prefixes[0]))
    spill = PrefixSpill(tmp_path, int(2.5 * size), digest, base.device)  # room for two files
    spill.put(keys[0], prefixes[0])
    spill.put(keys[1], prefixes[1])
    assert spill.get(keys[0], 3) is not None  # 0 now used after 1
    spill.put(keys[2], prefixes[2])  # 1 goes
    s = spill.stats()
    assert (s.files, s.writes, s.evictions, s.hits) == (2, 3, 1, 1) and s.bytes <= s.limit
    assert {p.stem for p in spilled(spill)} == {keys[0], keys[2]}
    assert spill.get(keys[1], 3) is None and spill.stats().misses == 1
    # a restart finds the files left, oldest first, and trims them to a smaller limit
    again = PrefixSpill(tmp_path, int(1.5 * size), digest, base.device)
    assert again.stats().files == 1 and len(spilled(again)) == 1
    assert PrefixSpill(tmp_path, 10 * size, digest, base.device).put(keys[3], prefixes[3])
    assert not PrefixSpill(tmp_path, size // 2, digest, base.device).put(keys[3], prefixes[3])  # larger than the limit


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "delete"])
def test_a_bad_or_missing_file_is_a_miss_and_deleted(pm, base, tmp_path, damage, caplog):
    prompt = weight(base, P=3, seed=2)
    digest = model_digest(pm)
    key = prefix_key(digest, prompt)
    spill = PrefixSpill(tmp_path, MB, digest, base.device)
    spill.put(key, compute_prefixes(pm, [prompt])[0])
    path = spilled(spill)[0]
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # the header intact, one value changed: the checksum catches it
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif damage == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="softprompt.serve.spill"):
        assert spill.get(key, 3) is None
    s = spill.stats()
    assert not path.exists() and (s.files, s.bytes, s.misses) == (0, 0, 1)
    assert s.errors == (damage != "delete") and len(caplog.records) == (damage != "delete")
    slot = PrefixSlot(3, prompt=prompt)
    assert not spill.restore(slot) and slot.spill_key == key  # computed again, then spilled again


# -- in the server


def test_an_evicted_input_prompt_is_read_back_instead_of_prefilled(base, tmp_path):
    """Room for one entry in memory: p0, p1, p0 again. p0's second use is a spill hit (no prefill),
    its prefix bit-identical to the one computed, its answer equal to a fresh server's."""
    folder = tmp_path / "prompts"
    for i in range(2):
        write(base, folder, f"p{i}", seed=i)
    with Engine(base, EngineConfig(max_wait_ms=0), prompts_dir=folder) as fresh:
        fresh.bank.load_all(warm=0)
        want = fresh.classify("the match ended", "p0").scores
        assert isinstance(fresh.bank.spill, NoSpill) and fresh.bank.stats().spill.limit == 0  # off by default
    with spill_engine(base, folder, tmp_path / "spill", mb=1.5 * one_entry_mb(base)) as eng:
        eng.bank.load_all(warm=0)
        first = eng.classify("the match ended", "p0")
        computed = eng.bank.get("p0").prefix
        eng.classify("the match ended", "p1")  # p0 evicted from memory
        eng.bank.spill.flush()
        s = eng.bank.stats()
        assert (s.prefills, s.evictions, s.spill.writes, s.spill.files) == (2, 1, 2, 2)
        again = eng.classify("the match ended", "p0")
        s = eng.bank.stats()
        assert (s.prefills, s.spill.hits) == (2, 1)  # read back, not computed
        assert_same_prefix(eng.bank.get("p0").prefix, computed)
        assert again.scores == first.scores == want


def test_a_spill_folder_serves_the_next_server_and_a_replaced_prompt_is_computed(base, tmp_path):
    folder, spill_dir = tmp_path / "prompts", tmp_path / "spill"
    write(base, folder, "p", seed=0)
    with spill_engine(base, folder, spill_dir) as eng:
        eng.bank.load_all(warm=0)
        before = eng.classify("stocks fell", "p").scores
        prefix = eng.bank.get("p").prefix
    with spill_engine(base, folder, spill_dir) as eng:  # a restart: read back, nothing computed
        eng.bank.load_all(warm=0)
        assert eng.classify("stocks fell", "p").scores == before and eng.bank.stats().prefills == 0
        assert_same_prefix(eng.bank.get("p").prefix, prefix)
        write(base, folder, "p", seed=5)  # the same name, another tensor
        eng.bank.load_file("p")
        s = eng.bank.stats()
        assert (s.prefills, s.spill.hits) == (1, 1)
        replaced = eng.classify("stocks fell", "p").scores
    with Engine(base, EngineConfig(max_wait_ms=0), prompts_dir=folder) as fresh:
        fresh.bank.load_all(warm=0)
        assert fresh.classify("stocks fell", "p").scores == replaced != before


def test_another_base_model_misses(base, tmp_path):
    folder, spill_dir = tmp_path / "prompts", tmp_path / "spill"
    write(base, folder, "p")
    with spill_engine(base, folder, spill_dir) as eng:
        eng.bank.load_all(warm=0)
        eng.classify("x", "p")
    other = copy.deepcopy(base.model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "layers.0" in n).mul_(1.5)
    other_base = wrap_base_model(other, base.tokenizer, base.name)  # its prompt files still pass the check
    with spill_engine(other_base, folder, spill_dir) as eng:
        eng.bank.load_all(warm=0)
        eng.classify("x", "p")
        s = eng.bank.stats()
        assert (s.prefills, s.spill.hits, s.spill.misses) == (1, 0, 1)


def test_a_folder_that_cannot_be_written_never_stops_serving(base, tmp_path, caplog):
    folder, spill_dir = tmp_path / "prompts", tmp_path / "spill"
    for i in range(3):
        write(base, folder, f"p{i}", seed=i)
    with spill_engine(base, folder, spill_dir) as eng:
        eng.bank.load_all(warm=0)
        spill_dir.rmdir()
        spill_dir.write_text("not a folder any more")  # every write fails, even as root
        with caplog.at_level(logging.WARNING, logger="softprompt.serve.spill"):
            for i in range(3):
                assert eng.classify("x", f"p{i}").label in TOPICS
            eng.bank.spill.flush()
        s = eng.bank.stats()
        assert (s.prefills, s.spill.writes, s.spill.errors) == (3, 0, 3)
        assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1  # logged once
        assert eng.running


def test_deep_prompts_are_not_spilled_and_metrics_show_the_spill(base, tmp_path):
    from softprompt.methods.deep_prompt import deep_init

    folder = tmp_path / "prompts"
    write(base, folder, "p")
    with spill_engine(base, folder, tmp_path / "spill") as eng:
        eng.bank.load_all(warm=0)
        w = weight(base, P=3, seed=3)
        with torch.no_grad():
            kv = deep_init(eng.pm, w)
        eng.bank.add_tensor("deep", kv, PromptMeta.for_base(base, 3, method="prefix", task="classify", labels=TOPICS))
        eng.classify("x", "deep")
        eng.classify("x", "p")
        eng.bank.spill.flush()
        value = lambda name: eng.metrics.registry.get_sample_value(name)  # noqa: E731
        assert value("softprompt_prefix_spill_writes_total") == 1 and value("softprompt_prefix_spill_files") == 1
        assert value("softprompt_prefix_spill_bytes") > 0 and value("softprompt_prefix_spill_limit_bytes") == 4 * MB
        for name in ("hits", "misses", "evictions", "errors", "dropped", "read_seconds"):
            assert value(f"softprompt_prefix_spill_{name}_total") is not None
        assert value("softprompt_prefix_prefills_total") == 1  # the existing names unchanged


def test_a_temporary_spill_folder_is_removed_when_the_server_stops(base, tmp_path):
    write(base, tmp_path, "p")
    with spill_engine(base, tmp_path, None) as eng:
        eng.bank.load_all(warm=0)
        eng.classify("x", "p")
        eng.bank.spill.flush()
        where = eng.bank.spill.dir
        assert len(list(where.glob("*.safetensors"))) == 1
    assert not where.exists()


def test_settings_are_checked_naming_the_flag(base, tmp_path):
    for bad in (-1, True, "5", float("nan")):
        with pytest.raises(ConfigError, match="--prefix-spill-mb"):
            EngineConfig(prefix_spill_mb=bad)
    with pytest.raises(ConfigError, match="--prefix-spill-dir needs --prefix-spill-mb"):
        EngineConfig(prefix_spill_dir=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--prefix-spill-dir .* is not a folder"):
        EngineConfig(prefix_spill_mb=8, prefix_spill_dir=str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="--prefix-spill-dir must not be inside --prompts"):
        ServeConfig(prompts_dir=str(tmp_path), engine=EngineConfig(prefix_spill_mb=8, prefix_spill_dir=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="--prefix-spill-mb .* smaller than the key/value prefix of a single virtual token"):
        spill_engine(base, None, tmp_path / "s", spill_mb=1e-6)
    assert EngineConfig(prefix_spill_mb=0).prefix_spill_mb == 0  # 0: off


def test_a_kept_folder_loses_only_the_spills_own_leftovers(pm, base, tmp_path):
    """Start-up deletes the spill's temp files a crash left, never another program's files."""
    import os

    ours, theirs, other = tmp_path / f".{'a' * 64}.1.2.tmp", tmp_path / "download.tmp", tmp_path / "notes.safetensors"
    for f in (ours, theirs, other):
        f.write_bytes(b"x")
        os.utime(f, (1, 1))  # long ago
    spill = PrefixSpill(tmp_path, MB, model_digest(pm), base.device)
    assert not ours.exists() and theirs.exists() and other.exists() and spill.stats().files == 0


def test_prefixes_are_written_by_the_spills_own_thread(base, tmp_path, monkeypatch):
    """The worker only queues a computed prefix; the file is written on the spill's thread, where
    the model lock is not taken (so a slow disk never holds up a step)."""
    import threading

    write(base, tmp_path / "prompts", "p")
    with spill_engine(base, tmp_path / "prompts", tmp_path / "spill") as eng:
        eng.bank.load_all(warm=0)
        seen = []
        put = PrefixSpill.put
        monkeypatch.setattr(PrefixSpill, "put", lambda self, *a: (seen.append(threading.current_thread().name), put(self, *a))[1])
        eng.classify("x", "p")
        eng.bank.spill.flush()
        assert seen == ["prefix-spill"] and eng.bank.stats().spill.writes == 1
