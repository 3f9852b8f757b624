"""precision.py: --precision auto / the server's --dtype auto follow what the CPU really runs fast,
and long commands show progress unless --quiet."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from softprompt import precision, progress
from softprompt.cli import main
from softprompt.errors import ConfigError

# /proc/cpuinfo flags of the three CPU kinds this project's machines have had (abridged).
ICE_LAKE = frozenset("fpu sse avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_vbmi2 avx512_bitalg".split())
ZEN4 = frozenset("fpu sse avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_vbmi2".split())
SAPPHIRE_RAPIDS = frozenset("fpu sse avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split())
GRAVITON3 = frozenset("fp asimd sve bf16 i8mm svebf16".split())
GRAVITON2 = frozenset("fp asimd atomics asimddp".split())


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(precision.BF16_ENV, raising=False)


@pytest.mark.parametrize("flags, machine, native", [
    (ICE_LAKE, "x86_64", False), (ZEN4, "x86_64", True), (SAPPHIRE_RAPIDS, "x86_64", True),
    (GRAVITON3, "aarch64", True), (GRAVITON2, "aarch64", False), (frozenset(), "x86_64", False),
    (ZEN4, "ppc64le", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, machine, native):
    assert precision.cpu_has_native_bf16(flags, machine) is native


def test_env_overrides_the_flags(monkeypatch):
    monkeypatch.setenv(precision.BF16_ENV, "1")
    assert precision.cpu_has_native_bf16(ICE_LAKE, "x86_64")
    monkeypatch.setenv(precision.BF16_ENV, "0")
    assert not precision.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "x86_64")
    monkeypatch.setenv(precision.BF16_ENV, "yes")
    with pytest.raises(ConfigError, match=r"^\$SOFTPROMPT_CPU_BF16 must be 1 .* or 0 .*, got 'yes'$"):
        precision.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "x86_64")


def _cpu(monkeypatch, flags):
    """Pose as a CPU with these flags: oneDNN's own answer is the real CPU's (on a CPU without
    AVX-512 it says no bf16 at all), so it poses too, as such a CPU's oneDNN answers."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "_machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "onednn_bf16", lambda: torch.backends.mkldnn.is_available() and "avx512f" in flags)


def test_auto_is_fp32_where_bf16_is_emulated(monkeypatch):
    """oneDNN says bf16 is 'supported' on Ice Lake (it emulates it, 3.5x slower): auto must not pick it."""
    _cpu(monkeypatch, ICE_LAKE)
    assert precision.resolve_precision("auto", torch.device("cpu")) is None
    assert precision.fast_weight_dtype("auto", "cpu") == "float32"


def test_auto_is_bf16_where_the_cpu_has_it(monkeypatch):
    _cpu(monkeypatch, ZEN4)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert precision.resolve_precision("auto", "cpu") is torch.bfloat16
    assert precision.fast_weight_dtype("auto", "cpu") == "bfloat16"
    assert precision.fast_weight_dtype("float32", "cpu") == "float32"  # an explicit choice is kept


def test_bf16_on_an_emulating_cpu_runs_with_a_warning(monkeypatch, caplog):
    _cpu(monkeypatch, ICE_LAKE)
    precision._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="softprompt.precision"):
        assert precision.resolve_precision("bf16", "cpu") is torch.bfloat16
        assert precision.resolve_precision("bf16", "cpu") is torch.bfloat16  # a second place in the same run
    assert len(caplog.records) == 1 and "no native bf16" in caplog.records[0].getMessage()
    caplog.clear()
    _cpu(monkeypatch, ZEN4)
    with caplog.at_level(logging.WARNING, logger="softprompt.precision"):
        precision.resolve_precision("bf16", "cpu")
    assert not [r for r in caplog.records if torch.backends.mkldnn.is_available()]


def test_bad_values_name_the_flag():
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        precision.resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        precision.fast_weight_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="--precision fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("argv", [["eval", "p.safetensors", "--data", "d.jsonl", "--precision", "fp8"],
                                  ["predict", "p.safetensors", "x", "--precision", "half"],
                                  ["demo", "--precision", "bf32"], ["serve", "--dtype", "int8"]])
def test_cli_choices_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("--precision" in err or "--dtype" in err) and "invalid choice" in err


def test_server_dtype_auto_follows_the_cpu(monkeypatch, tiny_dir):
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.engine import create_engine

    assert ServeConfig().dtype == "auto"
    _cpu(monkeypatch, ICE_LAKE)
    engine = create_engine(ServeConfig(model=str(tiny_dir)))
    assert engine.pm.base.model.dtype == torch.float32
    if torch.backends.mkldnn.is_available():
        _cpu(monkeypatch, SAPPHIRE_RAPIDS)
        engine = create_engine(ServeConfig(model=str(tiny_dir)))
        assert engine.pm.base.model.dtype == torch.bfloat16


def test_train_records_the_precision_it_ran(monkeypatch, tiny, tmp_path):
    from softprompt.artifact import load_prompt
    from softprompt.train import TrainConfig, train

    rows = [{"text": f"item {i}", "label": "ab"[i % 2]} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cpu(monkeypatch, ICE_LAKE)
    r = train(TrainConfig(data=str(data), out=str(tmp_path / "p.safetensors"), max_steps=1, batch_size=2,
                          prompt_length=2, quiet=True), base=tiny)
    assert load_prompt(r.path).meta.training["precision"] == "fp32"


# ----------------------------------------------------------------------------- progress


def test_bars_show_counts_unless_quiet(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0)
    with progress.shown(), progress.stage("baseline few-shot"):
        with progress.bar(30) as b:
            b.update(30)
    err = capsys.readouterr().err
    assert "baseline few-shot" in err and "30/30" in err
    with progress.shown(False), progress.stage("x"):
        with progress.bar(30) as b:
            b.update(30)
    assert capsys.readouterr().err == ""
    assert not progress.enabled()  # off outside shown(): the library is silent by default


def test_eval_command_shows_progress_and_quiet_silences_it(monkeypatch, capsys, tiny, tiny_dir, tmp_path):
    from softprompt import PromptMeta, SoftPrompt, save_prompt

    monkeypatch.setattr(progress, "DELAY_S", 0)
    labels = ["ab", "cd"]
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 2, "labels", labels=labels)
    prompt = save_prompt(tmp_path / "p.safetensors", p.weight,
                         PromptMeta.for_base(tiny, 2, task="classify", name="t", template="{text}:", labels=labels))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"x {i}", "label": labels[i % 2]}) + "\n" for i in range(20)))
    argv = ["eval", str(prompt), "--data", str(data), "--model", str(tiny_dir), "--precision", "fp32",
            "--baselines", "--batch-size", "4"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "soft prompt" in err and "/20 [" in err and "baseline bare model" in err and "baseline instruction:" in err
    assert main(argv + ["--quiet"]) == 0
    assert "/20 [" not in capsys.readouterr().err


def test_model_loading_shows_a_bar_only_when_it_takes_a_while(monkeypatch, tiny_dir):
    from softprompt import base

    assert not base._loading_takes_a_while("org/some-model")  # progress off: never
    with progress.shown():
        assert base._loading_takes_a_while("org/some-model")  # a hub id: transformers' download/load bars
        assert not base._loading_takes_a_while(str(tiny_dir))  # a small local checkpoint loads at once
        monkeypatch.setattr(base, "LARGE_CHECKPOINT_BYTES", 1)
        assert base._loading_takes_a_while(str(tiny_dir))


def test_training_attention_follows_the_precision():
    from softprompt.train import resolve_attention

    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "eager"  # measured faster under bf16 on CPU
    assert resolve_attention("auto", cpu, None) is None  # fp32: the model's own (SDPA), measured faster
    assert resolve_attention("auto", torch.device("cuda"), torch.bfloat16) is None
    assert resolve_attention("eager", cpu, None) == "eager" and resolve_attention("model", cpu, None) is None
