"""Every setting stated once: the train/tune/eval/predict/serve flags are generated from the config
dataclasses (config_flags.py), and they are the flags of before, name for name, default for default."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import pytest

from flagkit import COMMANDS, FIXTURE, snapshot
from softprompt.cli import build_parser
from softprompt.config_flags import add_config_flags, config_from_args, field_docs, flag, help_text
from softprompt.errors import ConfigError
from softprompt.train.config import TrainConfig
from softprompt.train.task_config import TaskConfig, TaskFields

SETTINGS = Path(__file__).with_name("train_settings.json")


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", COMMANDS)
def test_generated_flags_are_the_flags_of_before(command):
    """Name, dest, default, choices, action, required, metavar and help group of every flag, as
    recorded before the flags were generated (tests/cli_flags.json; the help texts may differ)."""
    old = {a["dest"]: a for a in json.loads(FIXTURE.read_text())[command]}
    new = {a["dest"]: a for a in snapshot()[command]}
    assert sorted(new) == sorted(old)
    for dest in old:
        assert new[dest] == old[dest], dest


def test_every_generated_flag_has_help():
    subs = build_parser().get_default("subcommands")
    for name in COMMANDS:
        for action in subs[name]._actions:
            assert action.help and len(action.help) > 10 and "``" not in action.help, (name, action.dest)


def test_result_settings_are_those_of_before():
    """A checkpoint records ``result_settings()``; a resumed run must find the same dict for the same
    settings (tests/train_settings.json was written by the hand-copied TrainConfig)."""
    cases = {
        "single": dict(data="train.jsonl", out="p.safetensors", template="T: {text}\nL:", labels=["b", "a"],
                       verbalizer="a=yes,b=no", eval_split=0.2, source_field="txt", target_field="lab", max_steps=7,
                       method="prefix", reparam="mlp", seed=3),
        "generate": dict(data="hf:x/y:train", task="generate", out="g.safetensors", name="gen", init="text",
                         init_text="hello", max_grad_norm=None, patience=None, report_to="none", max_time="90s"),
        "multi": dict(tasks=[TaskConfig(name="a", data="a.jsonl", labels=["x", "y"]),
                             TaskConfig(name="b", data="b.jsonl", task="generate", method="prefix", prompt_length=4)],
                      out="dir", lr=0.05, epochs=2.0),
    }
    recorded = json.loads(SETTINGS.read_text())
    for name, kw in cases.items():
        assert TrainConfig(**kw).result_settings() == recorded[name], name


def test_the_single_task_is_built_from_the_task_fields():
    c = TrainConfig(data="d.jsonl", out="x/topic.safetensors", template="{text}:", labels=["a", "b"], eval_split=0.5)
    (t,) = c.tasks_resolved
    assert t.name == "topic" and t.out == "x/topic.safetensors" and t.template == "{text}:" and t.eval_split == 0.5
    shared = {f.name for f in TaskFields.__dataclass_fields__.values()}
    assert all(getattr(t, n) == getattr(c, n) for n in shared - {"name"})


def test_special_conversions():
    c = config_from_args(TrainConfig, _parse("train", "--data", "d.jsonl", "--out", "p.safetensors",
                                             "--template", "T: {text}\\nL:", "--input-field", "src",
                                             "--output-field", "tgt", "--task", "generate", "--patience", "none",
                                             "--max-grad-norm", "OFF", "--max-steps", "auto", "--max-time", "1m"))
    assert c.template == "T: {text}\nL:" and c.source_field == "src" and c.target_field == "tgt"
    assert c.patience is None and c.max_grad_norm is None and c.max_steps == "auto" and c.max_time == 60.0
    assert c.device == "auto" and c.report_to == [] and c.out == "p.safetensors"
    c = config_from_args(TrainConfig, _parse("train", "--data", "d.jsonl", "--out", "p", "--labels", " b, a,,"))
    assert c.labels == ["b", "a"]
    with pytest.raises(ConfigError, match="^--out is required"):
        config_from_args(TrainConfig, _parse("train", "--data", "d.jsonl"))
    with pytest.raises(ConfigError, match="^give --text-field or --input-field, not both"):
        config_from_args(TrainConfig, _parse("train", "--data", "d", "--out", "p", "--text-field", "a",
                                             "--input-field", "b"))


def test_task_file_needs_no_out(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"tasks": [{"name": "a", "data": "a.jsonl"}]}))
    c = config_from_args(TrainConfig, _parse("train", "--task-file", str(tmp_path / "t.json")))
    assert c.out == "prompts" and c.multi


@pytest.mark.parametrize("argv,flag_name", [
    (["train", "--data", "d", "--batch-size", "x"], "--batch-size"),
    (["train", "--data", "d", "--patience", "often"], "--patience"),
    (["train", "--data", "d", "--schedule", "step"], "--schedule"),
    (["eval", "p", "--data", "d", "--limit", "1.5"], "--limit"),
    (["predict", "p", "--top-p", "high"], "--top-p"),
    (["serve", "--port", "http"], "--port"),
])
def test_a_bad_value_names_its_flag(argv, flag_name, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert f"argument {flag_name}:" in capsys.readouterr().err


def test_eval_predict_serve_build_their_configs():
    from softprompt.commands import eval as eval_cmd, predict as predict_cmd, serve as serve_cmd

    e = eval_cmd.config_from_args(_parse("eval", "p.safetensors", "--data", "d.jsonl", "--shots", "3", "--seed",
                                         "7", "--stop", "x", "--stop", "y", "--target-field", "t"))
    assert (e.prompt, e.data, e.baseline.shots, e.baseline.seed, e.stop, e.target_field) == \
        ("p.safetensors", "d.jsonl", 3, 7, ["x", "y"], "t")
    args = _parse("predict", "p.safetensors", "--field", "body", "--seed", "2", "--temperature", "0.5")
    p = config_from_args(predict_cmd.PredictConfig, args)
    assert (p.source_field, p.seed, p.temperature, p.device) == ("body", 2, 0.5, "auto")
    s = serve_cmd.config_from_args(_parse("serve", "--max-batch", "4", "--max-ensemble", "2", "--port", "0"))
    assert (s.engine.max_batch, s.engine.max_ensemble, s.port, s.device, s.prompts_dir) == (4, 2, 0, "auto", None)


@dataclass(kw_only=True)
class _WithNewOption(TrainConfig):
    shiny_option: int = 7
    """A brand-new training option, documented once here."""


def test_a_new_field_is_a_new_flag_without_touching_the_command(monkeypatch, capsys):
    """The issue's test: one field with its docstring, and --help shows it, the parsed config has it."""
    import softprompt.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "TrainConfig", _WithNewOption)
    sub = build_parser().get_default("subcommands")["train"]
    text = " ".join(sub.format_help().split())
    assert "--shiny-option SHINY_OPTION a brand-new training option, documented once here (default: 7)" in text
    args = sub.parse_args(["--data", "d.jsonl", "--out", "p.safetensors", "--shiny-option", "9"])
    config = train_cmd.config_from_args(args)
    assert isinstance(config, _WithNewOption) and config.shiny_option == 9
    tune = build_parser().get_default("subcommands")["tune"]
    assert "--shiny-option" in tune.format_help()  # tune takes train's flags


def test_field_docs_and_help_text():
    docs = field_docs(TrainConfig)
    assert docs["template"].startswith("Text around each example")  # inherited from TaskFields
    assert docs["out"].startswith("Prompt file to write (one task)")  # TrainConfig's own wins
    assert help_text("``--max-batch``: most rows in ``/batch``.\n  A 50% cut.") == "most rows in /batch. A 50%% cut"
    assert help_text("AdamW weight decay.") == "AdamW weight decay"
    assert help_text("Training data.") == "training data"


def test_generator_on_a_made_class():
    """Types -> parsers and choices; metadata help for a class without source."""
    from typing import Literal

    cls = make_dataclass("Made", [
        ("n", int | None, field(default=3, metadata=flag(help="a count"))),
        ("kind", Literal["a", "b"], field(default="a", metadata=flag(help="a kind"))),
        ("on", bool, field(default=False, metadata=flag(help="a switch"))),
        ("words", list[str], field(default_factory=list, metadata=flag(help="words"))),
        ("hidden", str, field(default="x", metadata=flag(cli=False))),
    ])
    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    made = config_from_args(cls, p.parse_args(["--n", "none", "--kind", "b", "--on", "--words", "x", "--words", "y"]))
    assert (made.n, made.kind, made.on, made.words, made.hidden) == (None, "b", True, ["x", "y"], "x")
    assert "--hidden" not in p.format_help() and config_from_args(cls, p.parse_args([])).n == 3


@pytest.mark.parametrize("field_name,value,flag_name", [
    ("dtype", "int8", "--dtype"), ("attention", "flash", "--attention"), ("schedule", "step", "--schedule"),
    ("prompt_dtype", "int4", "--prompt-dtype"), ("quantize", "2bit", "--quantize"), ("task", "regress", "--task"),
])
def test_a_value_outside_the_choices_is_refused_naming_the_flag(field_name, value, flag_name):
    """One check for every field with choices (check_choices): the Python API gets the CLI's choices."""
    with pytest.raises(ConfigError, match=rf"^{flag_name} '{value}': choose one of "):
        TrainConfig(data="d.jsonl", **{field_name: value})
    TrainConfig(data="d.jsonl", quantize=None, reparam=None)  # None where the type allows it


def test_every_engine_count_refuses_zero_naming_its_flag():
    from dataclasses import fields

    from softprompt.serve.config import EngineConfig

    counts = [f.name for f in fields(EngineConfig) if f.type == "int"]
    assert len(counts) == 14
    for name in counts:
        flag_name = "--" + name.replace("_", "-")
        with pytest.raises(ConfigError, match=rf"^{flag_name} must be a whole number of at least 1, got 0$"):
            EngineConfig(**{name: 0})
