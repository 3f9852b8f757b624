"""The prompt-methods registry (softprompt.methods): every entry complete, a lookup of an unknown
method one line naming the choices, every `Literal` of method names the registry's, and the sites
(file format, PEFT type, shapes, serving, backends) reading the entry: changing nothing but an entry
changes what they do. No method comparisons outside the registry (AST scan, like test_layout)."""

from __future__ import annotations

import ast
import dataclasses
import json
import struct
import typing

import pytest
import torch

from softprompt.artifact import FORMAT_VERSION, PromptMeta, prompt_bytes, prompt_from_bytes, shape_words, tensor_shape
from softprompt.errors import ConfigError, PromptFileError
from softprompt.methods import METHODS, PromptMethod, check_backend, method, method_for_peft

from registry_scan import comparisons_outside, name_comparisons

INPUT = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # (P, d)
DEEP = torch.arange(2 * 2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 2, 1, 3, 2)  # (layers, 2, kv_heads, P, head_dim)
TENSORS = {"prompt": INPUT, "prefix": DEEP}


def meta(name: str, **kw) -> PromptMeta:
    return PromptMeta(base_model="m", fingerprint="f" * 64, length=0, dim=4, method=name, created="2026", **kw)


def header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


# ----------------------------------------------------------------------------- the registry itself


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_every_field(name):
    m = METHODS[name]
    assert isinstance(m, PromptMethod) and m.name == name
    for f in dataclasses.fields(PromptMethod):
        value = getattr(m, f.name)
        if f.name in ("start", "report_note"):  # None / "": the input-prompt init itself, no note
            continue
        assert value is not None and value != "" and value != (), f"{name}.{f.name} is empty"
    for f in ("measure", "shape", "base_mismatch", "shape_words", "report_shape", "trainable", "serve"):
        assert callable(getattr(m, f)), f"{name}.{f} is not callable"
    assert m.start is None or callable(m.start)
    assert 1 <= m.format_version <= FORMAT_VERSION and m.lr > 0
    assert m.title in m.about and m.a.endswith(m.title)


def test_entries_do_not_collide():
    """Two methods with one tensor name, PEFT type or title could not be told apart in a file or an adapter."""
    for f in ("name", "title", "tensor_name", "peft_type"):
        values = [getattr(m, f) for m in METHODS.values()]
        assert len(set(values)) == len(values), f
    imports = [t for m in METHODS.values() for t in m.peft_imports]
    assert len(set(imports)) == len(imports) and all(m.peft_type in m.peft_imports for m in METHODS.values())
    assert min(m.format_version for m in METHODS.values()) == 1  # format-1 files hold some method


def test_unknown_method_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        method("lora", "--method")
    assert str(e.value) == "--method: unknown prompt method 'lora'; choose one of prompt, prefix"
    with pytest.raises(PromptFileError, match=r"^f.safetensors: unknown prompt method \['x'\]; choose one of prompt, prefix$"):
        method(["x"], "f.safetensors", PromptFileError)  # not even a string (JSON metadata can hold anything)
    assert method("prefix") is METHODS["prefix"] and method_for_peft("LORA") is None
    assert method_for_peft("P_TUNING") is METHODS["prompt"] and method_for_peft("PREFIX_TUNING") is METHODS["prefix"]


def test_literal_choices_are_the_registrys():
    """Every `Literal` of method names (flags, task files, the HTTP schema, tune's recipes) is the registry's keys."""
    from softprompt.trainable import REPARAMS
    from softprompt.serve.schemas import PromptOut
    from softprompt.train.config import TrainConfig
    from softprompt.train.task_config import TaskConfig
    from softprompt.tune.config import SEARCH_METHODS, SearchMethod

    names = tuple(METHODS)
    hints = [typing.get_type_hints(TrainConfig)["method"], typing.get_type_hints(SearchMethod)["method"],
             typing.get_type_hints(PromptOut)["method"]]
    task = typing.get_type_hints(TaskConfig)["method"]  # Literal[...] | None
    hints.append(next(a for a in typing.get_args(task) if a is not type(None)))
    for hint in hints:
        assert typing.get_args(hint) == names, hint
    assert {r.method for r in REPARAMS.values()} <= set(names)
    assert {s.method for s in SEARCH_METHODS.values()} <= set(names)
    assert TrainConfig.__dataclass_fields__["method"].default == names[0]  # the registry's first is the default


def test_cli_choices_come_from_the_registry():
    from softprompt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    flag = {o: a for a in sub["train"]._actions for o in a.option_strings}["--method"]
    assert list(flag.choices) == list(METHODS) and flag.default == "prompt"
    peft = {o: a for a in sub["export"]._actions for o in a.option_strings}["--peft-type"]
    assert list(peft.choices) == [m.peft_type for m in METHODS.values()] and peft.default is None


def test_peft_readers_and_writers_cover_the_registry():
    from softprompt.artifact.peft import ADAPTER_READERS, ADAPTER_WRITERS

    assert set(ADAPTER_READERS) == {t for m in METHODS.values() for t in m.peft_imports}
    assert {m.peft_type for m in METHODS.values()} <= set(ADAPTER_WRITERS)


def test_backends_are_serve_backends():
    from softprompt.serve.config import BACKEND_NAMES

    for m in METHODS.values():
        assert set(m.backends) <= set(BACKEND_NAMES) and m.backends[0] == "transformers"


# ----------------------------------------------------------------------------- each entry's facts


@pytest.mark.parametrize("name", list(METHODS))
def test_measure_and_shape_agree(name):
    m, t = METHODS[name], TENSORS[name]
    md = meta(name)
    for k, v in m.measure(t).items():
        setattr(md, k, v)
    assert m.shape(md) == tuple(t.shape) == tensor_shape(md) and md.length == 3
    other = TENSORS["prefix" if name == "prompt" else "prompt"]
    with pytest.raises(ValueError, match="tensor must be"):
        m.measure(other)


def test_file_format_per_method_pinned():
    """Input prompts stay format 1 with tensor "prompt" (no method field, what older versions read);
    deep prompts are format 2 with tensor "prefix" and their kv_layout."""
    h = header(prompt_bytes(INPUT, meta("prompt")))
    assert set(h) == {"__metadata__", "prompt"} and h["__metadata__"]["format_version"] == "1"
    assert "method" not in json.loads(h["__metadata__"]["softprompt"])
    h = header(prompt_bytes(DEEP, meta("prefix")))
    assert set(h) == {"__metadata__", "prefix"} and h["__metadata__"]["format_version"] == "2"
    assert json.loads(h["__metadata__"]["softprompt"])["kv_layout"] == [2, 1, 2]
    assert METHODS["prompt"].peft_type == "PROMPT_TUNING" and METHODS["prefix"].peft_type == "PREFIX_TUNING"


def test_words_per_method():
    md = meta("prefix")
    prompt_bytes(DEEP, md)
    assert shape_words(md) == "deep prompt: 2 layers x 2 (keys, values) x 1 kv heads x 3 virtual tokens x 2 head dims"
    md = meta("prompt")
    prompt_bytes(INPUT, md)
    assert shape_words(md) == "input prompt: 3 virtual tokens x 4 dims"


# ----------------------------------------------------------------------------- the sites read the entry


def test_prompt_file_reads_the_entry(monkeypatch):
    """Changing nothing but the registry changes the file: tensor name and format version."""
    monkeypatch.setitem(METHODS, "prefix", dataclasses.replace(METHODS["prefix"], tensor_name="kv"))
    monkeypatch.setitem(METHODS, "prompt", dataclasses.replace(METHODS["prompt"], format_version=2))
    data = prompt_bytes(DEEP, meta("prefix"))
    assert "kv" in header(data) and torch.equal(prompt_from_bytes(data).tensor, DEEP)
    h = header(prompt_bytes(INPUT, meta("prompt")))
    assert h["__metadata__"]["format_version"] == "2" and json.loads(h["__metadata__"]["softprompt"])["method"] == "prompt"


def test_format_1_refusal_reads_the_entry(monkeypatch):
    data = prompt_bytes(DEEP, meta("prefix"))
    h = header(data)
    h["__metadata__"]["format_version"] = "1"
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    n = struct.unpack("<Q", data[:8])[0]
    old = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    with pytest.raises(PromptFileError, match="format-1 file can only hold an input prompt, metadata says 'prefix'"):
        prompt_from_bytes(old)
    monkeypatch.setitem(METHODS, "prefix", dataclasses.replace(METHODS["prefix"], format_version=1))
    assert torch.equal(prompt_from_bytes(old).tensor, DEEP)


def test_peft_export_type_reads_the_entry(monkeypatch):
    from softprompt.artifact import LoadedPrompt
    from softprompt.artifact.peft import _check_peft_type

    md = meta("prompt")
    prompt_bytes(INPUT, md)
    with pytest.raises(PromptFileError, match=r"input prompt \(method 'prompt'\) holds input embeddings, not keys/values"):
        _check_peft_type(md, "PREFIX_TUNING", "p")
    monkeypatch.setitem(METHODS, "prompt", dataclasses.replace(METHODS["prompt"], peft_type="PREFIX_TUNING"))
    _check_peft_type(md, "PREFIX_TUNING", "p")  # now its own type
    assert isinstance(LoadedPrompt(INPUT, md), LoadedPrompt)


def test_vllm_refusal_reads_the_entry(monkeypatch):
    """One message for the vLLM export and the vLLM backend, from the registry's backends."""
    from softprompt.vllm.export import export_vllm
    from softprompt.vllm.steps import embeds_prefix
    from softprompt.artifact import LoadedPrompt

    md = meta("prompt")
    prompt_bytes(INPUT, md)
    assert torch.equal(embeds_prefix("x", INPUT, md).rows, INPUT)
    with pytest.raises(PromptFileError) as e:
        check_backend("prefix", "vllm", "prompt 'd'")
    assert str(e.value) == (
        "prompt 'd': a deep prompt (method 'prefix') holds keys/values at every layer, which vLLM cannot serve: vLLM "
        "takes a prompt only as input embeddings (prompt_embeds); serve it with --backend transformers, or export it "
        "with --format peft (PREFIX_TUNING)")
    monkeypatch.setitem(METHODS, "prompt", dataclasses.replace(METHODS["prompt"], backends=("transformers",)))
    with pytest.raises(PromptFileError, match="^prompt 'x': an input prompt .* vLLM takes a prompt only as nothing"):
        embeds_prefix("x", INPUT, md)
    with pytest.raises(PromptFileError, match="an input prompt .* serve it with --backend transformers"):
        export_vllm(LoadedPrompt(INPUT, md), "/nonexistent/never-written")


def test_report_words_read_the_entry(monkeypatch):
    from softprompt.evaluate.report import _prompt_shape

    md = meta("prefix", dtype="float16")
    prompt_bytes(DEEP, md)
    assert _prompt_shape(md) == "3 virtual tokens at every layer: 2 layers x keys/values x 1 kv heads x 2 (float16)"
    monkeypatch.setitem(METHODS, "prefix", dataclasses.replace(METHODS["prefix"], report_shape=lambda m: "pinned"))
    assert _prompt_shape(md) == "pinned"


def test_serving_prefix_reads_the_entry(tiny):
    """A deep prompt's stored keys/values are its prefix (nothing runs); an input prompt's is left to compute."""
    from softprompt.artifact import LoadedPrompt
    from softprompt.model import PromptedModel
    from softprompt.serve.bank import prefix_slot

    pm = PromptedModel(tiny)
    L, H, hd = tiny.kv_layout
    kv = torch.randn(L, 2, H, 3, hd)
    md = PromptMeta.for_base(tiny, 3, method="prefix", kv_layout=[L, H, hd])
    _, slot = prefix_slot(pm, "d", LoadedPrompt(kv, md))
    assert slot.filled and torch.equal(slot.get().layers[1][0], kv[1, 0].to(pm.lm.dtype))
    _, slot = prefix_slot(pm, "p", LoadedPrompt(torch.randn(3, tiny.dim), PromptMeta.for_base(tiny, 3)))
    assert not slot.filled and slot.prompt is not None


# ----------------------------------------------------------------------------- no comparisons outside


def test_no_method_comparisons_outside_the_registry():
    found = comparisons_outside("methods", set(METHODS), near="method", exact=True)
    assert not found, f"ask softprompt.methods instead of comparing method names: {found}"


def test_the_scan_can_fail():
    src = 'if meta.method == "prefix":\n    pass\nx = {"prompt": 1, "prefix": 2}\ny = m.method != "prompt"\n'
    assert name_comparisons(ast.parse(src), set(METHODS), near="method", exact=True) == [1, 3, 4]
