"""Malformed prompt files are refused with one PromptFileError line, never another exception: the
files a hostile upload sent (F8 tensors, empty prompts, metadata nested 10,000 deep, labels and
templates of the wrong type), and thousands of seeded mutations of a valid file."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from softprompt import PromptMeta, load_prompt, save_prompt
from softprompt.artifact.prompt_file import prompt_from_bytes, safetensors_bytes
from softprompt.errors import PromptFileError

D = 16


def _valid_meta(**kw) -> dict:
    meta = {"base_model": "m", "fingerprint": "f" * 12, "length": 4, "dim": D, "task": "classify",
            "template": "Text: {text}\nLabel:", "labels": ["a", "b"], "training": {"steps": 2}}
    meta.update(kw)
    return meta


def _file(meta: dict, tensor: torch.Tensor | None = None, name: str = "prompt", version: str = "1") -> bytes:
    tensor = torch.zeros(4, D, dtype=torch.float16) if tensor is None else tensor
    return safetensors_bytes({name: tensor}, {"format_version": version, "softprompt": json.dumps(meta)})


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE = {
    "an F8 tensor": _file(_valid_meta(), torch.zeros(4, D).to(torch.float8_e4m3fn)),
    "an int tensor": _file(_valid_meta(), torch.zeros(4, D, dtype=torch.int32)),
    "a [0, d] prompt": _file(_valid_meta(length=0), torch.zeros(0, D, dtype=torch.float16)),
    "labels [1, 2]": _file(_valid_meta(labels=[1, 2])),
    "template 5": _file(_valid_meta(template=5)),
    "length true": _file(_valid_meta(length=True)),
    "verbalizer of lists": _file(_valid_meta(verbalizer={"a": ["x"]})),
    "training a list": _file(_valid_meta(training=[1])),
    "dtype F8": _file(_valid_meta(dtype="float8")),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_files_are_one_line(what):
    with pytest.raises(PromptFileError) as e:
        prompt_from_bytes(HOSTILE[what], "up.safetensors")
    assert "\n" not in str(e.value) and str(e.value).startswith("up.safetensors: ")


def test_metadata_nested_10000_deep_is_one_line():
    meta = json.dumps(_valid_meta())[:-1] + ', "extra": {"x": ' + _nested(10000) + "}}"
    data = safetensors_bytes({"prompt": torch.zeros(4, D, dtype=torch.float16)}, {"format_version": "1", "softprompt": meta})
    with pytest.raises(PromptFileError, match="nested deeper than"):
        prompt_from_bytes(data, "deep")
    meta = json.dumps(_valid_meta())[:-1] + ', "extra": {"x": ' + _nested(40) + "}}"  # parses, still too deep
    data = safetensors_bytes({"prompt": torch.zeros(4, D, dtype=torch.float16)}, {"format_version": "1", "softprompt": meta})
    with pytest.raises(PromptFileError, match="nested deeper than 32 levels"):
        prompt_from_bytes(data, "deep")


def test_the_valid_file_loads():
    loaded = prompt_from_bytes(_file(_valid_meta()), "ok")
    assert loaded.tensor.shape == (4, D) and loaded.meta.labels == ["a", "b"]


def _mutations(data: bytes, rng: random.Random):
    """Byte flips and truncations of the file, and metadata fields replaced by values of other types."""
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)
    for _ in range(50):
        yield data[: rng.randrange(len(data))]
    odd = [None, True, -1, 0, 2**80, 1.5, "", "x", [], [1], {}, {"a": 1}, [[[]]], "nan"]
    for key in list(_valid_meta()) + ["method", "kv_layout", "dtype", "sketch", "verbalizer", "name", "format_version"]:
        for v in odd:
            yield _file(_valid_meta(**{key: v}))
    for version in ("0", "2", "x", "-1", "1e3"):
        yield _file(_valid_meta(), version=version)


def test_mutated_files_raise_only_prompt_file_errors(tmp_path):
    data = _file(_valid_meta())
    rng = random.Random(0)
    refused = 0
    for i, mutant in enumerate(_mutations(data, rng)):
        try:
            loaded = prompt_from_bytes(mutant, "m")
        except PromptFileError as e:
            assert "\n" not in str(e), str(e)
            refused += 1
            continue
        assert torch.isfinite(loaded.tensor).all() and loaded.tensor.dim() == 2  # what passes is usable
        json.dumps(loaded.meta.training), json.dumps(loaded.meta.extra)  # and can be shown
    assert refused > 200
    (tmp_path / "f8.safetensors").write_bytes(HOSTILE["an F8 tensor"])
    with pytest.raises(PromptFileError, match="f8.safetensors: prompt tensor is float8_e4m3fn"):
        load_prompt(tmp_path / "f8.safetensors")
