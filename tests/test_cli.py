from __future__ import annotations

import json

import pytest

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.cli import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "inspect"):
        assert cmd in out


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
    capsys.readouterr()


def test_inspect_human_and_json(tiny, tmp_path, capsys):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "vocab")
    meta = PromptMeta.for_base(tiny, 4, task="classify", labels=["x", "y"], verbalizer={"x": "ex"}, name="demo")
    path = save_prompt(tmp_path / "p.safetensors", p.weight, meta)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 virtual tokens x 64 dims" in out and "x -> 'ex'" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["length"] == 4 and info["task"] == "classify" and info["file_bytes"] == path.stat().st_size


def test_inspect_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.safetensors" in err
