"""One --help convention for every command: defaults once, the same words for --quiet and
--device, examples at the end; --device checked the same way everywhere."""

from __future__ import annotations

import re

import pytest
import torch

from softprompt.cli import build_parser, main
from softprompt.cli_help import EXAMPLES, QUIET_HELP
from softprompt.devices import resolve_device
from softprompt.errors import ConfigError


def _helps() -> dict[str, str]:
    subs = build_parser().get_default("subcommands")
    return {name: p.format_help() for name, p in subs.items()}


def test_every_command_has_examples_and_no_default_twice():
    helps = _helps()
    assert list(helps) == ["example-data", "train", "tune", "eval", "predict", "inspect", "export", "import", "serve", "demo"]
    for name, text in helps.items():
        flat = " ".join(text.split())
        assert "examples:" in text and EXAMPLES[name].split("\n")[0] in text, name
        assert not re.search(r"\(default:? [^)]*\)[^(]{0,3}\(default", flat), name
        assert "(default " not in flat, name  # one style: "(default: X)"


def test_quiet_and_device_mean_one_thing_everywhere():
    subs = build_parser().get_default("subcommands")
    for name in ("train", "eval", "predict", "serve", "demo"):
        acts = {a.dest: a for a in subs[name]._actions}
        assert acts["device"].default == "auto" and "CUDA when present" in acts["device"].help, name
    for name, p in subs.items():
        for a in p._actions:
            if a.dest == "quiet":
                assert a.help == QUIET_HELP, name
    demo = subs["demo"].parse_args(["--steps", "3"])
    assert demo.steps == 3 and subs["demo"].parse_args(["--max-steps", "4"]).steps == 4  # --steps kept as an alias


def test_device_values():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(ConfigError, match=r"^--device .*: choose auto \(CUDA when present, else CPU\)"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda:0")


def test_a_bad_device_is_one_line(capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n')
    assert main(["predict", str(tmp_path / "missing.safetensors"), "--device", "tpu", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'tpu'" in err[0] or "missing.safetensors" in err[0]
