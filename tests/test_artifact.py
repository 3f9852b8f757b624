"""The prompt file: round trip, size, and every kind of bad file rejected with its message."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from softprompt import PromptFileError, PromptMeta, SoftPrompt, load_prompt, save_prompt
from softprompt.artifact import FORMAT_VERSION, prompt_bytes


def make(tiny, length=5):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, length, "vocab")
    meta = PromptMeta.for_base(tiny, length, task="classify", template="Text: {text}\nLabel:",
                               labels=["a", "b"], name="t", training={"steps": 3})
    return p.weight.detach(), meta


def rewrite_header(path, fn):
    """Rewrite a prompt file's safetensors metadata with fn(dict) -> dict."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = fn(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_bit_exact(tiny, tmp_path, dtype):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta, dtype=dtype)
    a = load_prompt(path, tiny)
    b = load_prompt(path, tiny)
    assert torch.equal(a.tensor, b.tensor)
    assert torch.equal(a.tensor, w.to(getattr(torch, dtype)).float())
    assert a.meta.labels == ["a", "b"] and a.meta.template == "Text: {text}\nLabel:"
    assert a.meta.training == {"steps": 3} and a.meta.dtype == dtype and a.meta.format_version == 1  # input prompts stay format 1
    # saving what was loaded gives the same file again, byte for byte (a canonical header)
    save_prompt(tmp_path / "q.safetensors", a.tensor, a.meta, dtype=dtype)
    assert (tmp_path / "q.safetensors").read_bytes() == path.read_bytes()


def test_files_get_the_mode_of_a_plain_write(tiny, tmp_path):
    import os

    w, meta = make(tiny)
    old = os.umask(0o027)
    try:
        path = save_prompt(tmp_path / "p.safetensors", w, meta)
        assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
        path.chmod(0o604)
        save_prompt(path, w, meta)  # replacing keeps the file's mode
        assert path.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_same_content_same_bytes():
    from safetensors.torch import load

    from softprompt.artifact import safetensors_bytes

    tensors = {f"t{i}": torch.full((i + 1, 3), float(i)) for i in range(6)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    raw = {safetensors_bytes(tensors, metadata) for _ in range(8)}  # safetensors alone gives several
    assert len(raw) == 1
    data = raw.pop()
    assert int.from_bytes(data[:8], "little") % 8 == 0  # tensor data stays 8-byte aligned
    assert all(torch.equal(a, tensors[k]) for k, a in load(data).items())


def test_float16_overflow_falls_back_to_bfloat16(tiny, tmp_path):
    w, meta = make(tiny)
    w = w.clone()
    w[0, 0] = 1e6
    save_prompt(tmp_path / "p.safetensors", w, meta)
    assert load_prompt(tmp_path / "p.safetensors").meta.dtype == "bfloat16"


def test_write_is_atomic_on_failure(tiny, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    before = path.read_bytes()
    with pytest.raises(PromptFileError, match="NaN"):
        save_prompt(path, torch.full_like(w, float("nan")), meta)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompt(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0, 5, 100, -10])
def test_truncated_file(tiny, tmp_path, cut):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(PromptFileError, match=r"p\.safetensors: (truncated|not a valid)"):
        load_prompt(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(PromptFileError, match="not a valid safetensors"):
        load_prompt(path)


def test_pickle_is_not_a_prompt_file(tiny, tmp_path):
    path = tmp_path / "p.bin"
    torch.save({"prompt": torch.zeros(2, 2)}, path)
    with pytest.raises(PromptFileError):
        load_prompt(path)


def test_plain_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"prompt": torch.zeros(2, 4)}, tmp_path / "x.safetensors")
    with pytest.raises(PromptFileError, match="not a softprompt prompt file"):
        load_prompt(tmp_path / "x.safetensors")


def test_newer_format_version(tiny, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    rewrite_header(path, lambda h: {**h, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(PromptFileError, match="newer than this softprompt supports"):
        load_prompt(path)


def test_corrupt_metadata_json(tiny, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    rewrite_header(path, lambda h: {**h, "softprompt": "{oops"})
    with pytest.raises(PromptFileError, match="corrupt metadata"):
        load_prompt(path)


def test_shape_disagrees_with_metadata(tiny, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    rewrite_header(path, lambda h: {**h, "softprompt": h["softprompt"].replace('"length": 5', '"length": 6')})
    with pytest.raises(PromptFileError, match=r"shape \(5, 64\) but metadata says \(6, 64\)"):
        load_prompt(path)


def test_wrong_base_model_is_refused(tiny, tiny_family, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    other = tiny_family("qwen2")  # same width, other weights
    with pytest.raises(PromptFileError, match="trained for base model .* not .*fingerprint"):
        load_prompt(path, other)
    load_prompt(path, other, strict=False)  # explicitly allowed


def test_wrong_width_is_refused(tiny, tmp_path):
    from softprompt.testing import tiny_base

    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    wide = tiny_base(tmp_path / "wide", "llama", hidden=96)
    with pytest.raises(PromptFileError, match="prompt width 64 does not match"):
        load_prompt(path, wide, strict=False)


def test_fingerprint_ignores_load_dtype(tiny_dir, tiny):
    from softprompt import load_base_model

    half = load_base_model(str(tiny_dir), dtype="bfloat16")
    assert half.fingerprint == tiny.fingerprint


def test_bytes_api_matches_file(tiny, tmp_path):
    from softprompt.artifact import prompt_from_bytes

    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    a, b = prompt_from_bytes(prompt_bytes(w, meta)), load_prompt(path)
    assert torch.equal(a.tensor, b.tensor) and a.meta == b.meta


# ----------------------------------------------------------------------------- deep prompts (format 2)


def make_deep(base, length=3, seed=0):
    L, H, hd = base.kv_layout
    t = torch.randn(L, 2, H, length, hd, generator=torch.Generator().manual_seed(seed))
    return t, PromptMeta.for_base(base, length, task="generate", template="{text}", method="prefix")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma", "gemma3"])
def test_kv_layout_is_the_shape_of_the_models_cache(tmp_path, family):
    from softprompt.model import PromptedModel, cache_layers
    from softprompt.testing import tiny_base

    base = tiny_base(tmp_path / family, family)
    cache = PromptedModel(base).prefix_cache(torch.zeros(2, base.dim))
    layers = cache_layers(cache)
    L, H, hd = base.kv_layout
    assert len(layers) == L
    assert all(tuple(k.shape) == (1, H, 2, hd) and tuple(v.shape) == (1, H, 2, hd) for k, v in layers)


def test_deep_prompt_round_trip_is_format_2(tiny, tmp_path):
    t, meta = make_deep(tiny)
    path = save_prompt(tmp_path / "d.safetensors", t, meta, dtype="float32")
    a = load_prompt(path, tiny)
    assert a.meta.method == "prefix" and a.meta.format_version == 2 and a.meta.length == 3
    assert a.meta.kv_layout == list(tiny.kv_layout)
    assert torch.equal(a.tensor, t)
    save_prompt(tmp_path / "e.safetensors", a.tensor, a.meta, dtype="float32")
    assert (tmp_path / "e.safetensors").read_bytes() == path.read_bytes()


def test_input_prompts_stay_format_1_without_new_fields(tiny, tmp_path):
    w, meta = make(tiny)
    path = save_prompt(tmp_path / "p.safetensors", w, meta)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])["__metadata__"]
    assert header["format_version"] == "1"
    assert "method" not in json.loads(header["softprompt"]) and "kv_layout" not in json.loads(header["softprompt"])
    assert load_prompt(path, tiny).meta.method == "prompt"


def test_deep_prompt_for_another_layout_is_refused_in_one_line(tiny, tmp_path):
    t, meta = make_deep(tiny)
    path = save_prompt(tmp_path / "d.safetensors", t[:1], meta)  # one layer fewer than the base
    with pytest.raises(PromptFileError, match=r"deep prompt for 1 layers .* does not match base model") as e:
        load_prompt(path, tiny)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "kv_layout": None}, "lacks a valid kv_layout"),
    (lambda m: {**m, "kv_layout": [2, 2, 7]}, "tensor has shape"),
    (lambda m: {**m, "method": "lora"}, "unknown prompt method 'lora'"),
])
def test_bad_deep_prompt_metadata_is_refused(tiny, tmp_path, edit, message):
    t, meta = make_deep(tiny)
    path = save_prompt(tmp_path / "d.safetensors", t, meta)
    rewrite_header(path, lambda h: {**h, "softprompt": json.dumps(edit(json.loads(h["softprompt"])))})
    with pytest.raises(PromptFileError, match=message):
        load_prompt(path, tiny)


def test_format_1_file_cannot_claim_a_deep_prompt(tiny, tmp_path):
    t, meta = make_deep(tiny)
    path = save_prompt(tmp_path / "d.safetensors", t, meta)
    rewrite_header(path, lambda h: {**h, "format_version": "1"})
    with pytest.raises(PromptFileError, match="format-1 file can only hold an input prompt"):
        load_prompt(path, tiny)
