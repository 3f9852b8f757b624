"""Deep prompts (--method prefix) and reparameterised prompts (--reparam mlp|residual).

Equivalence first: a deep prompt's scores through our prefix path equal a plain HF forward over a
``DynamicCache`` built from the tensor; a mixed-method batch gives each row the loss it gets alone;
gradients reach the deep prompt only; a collapsed reparameterised prompt scores exactly like the
training-time one; a run interrupted and resumed ends bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import pytest
import torch

from softprompt import load_prompt
from softprompt.artifact import PromptMeta, save_prompt
from softprompt.trainable import REPARAMS, MLPPrefix, ScaledPrefix, build_prompt, collapse
from softprompt.methods.deep_prompt import DeepPrompt, deep_init
from softprompt.errors import ConfigError
from softprompt.model import PromptedModel
from softprompt.prefix import prefix_forward, source_state
from softprompt.scoring import label_logprobs, source_forward
from softprompt.testing import FAMILIES
from softprompt.train import TrainConfig, train
from softprompt.train.checkpoint import load_checkpoint
from softprompt.train.objective import Row, row_losses
from trainkit import easy_classification, learnable_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
LABELS = [[20], [21, 22, 23], [24, 25]]


def _deep(base, P: int = 3, seed: int = 0) -> torch.Tensor:
    L, H, hd = base.kv_layout
    return torch.randn(L, 2, H, P, hd, generator=torch.Generator().manual_seed(seed))


def _hf_label_scores(base, kv: torch.Tensor, source: list[int], labels: list[list[int]]) -> list[float]:
    """Summed log p(label | deep prompt, source) by a plain HF forward over a DynamicCache holding the
    tensor: attention mask over prefix + tokens, positions starting at P."""
    from transformers import DynamicCache

    P, out = kv.shape[3], []
    for lab in labels:
        ids = torch.tensor([source + lab])
        cache = DynamicCache(ddp_cache_data=[(kv[i, 0][None].clone(), kv[i, 1][None].clone()) for i in range(kv.shape[0])])
        T = ids.shape[1]
        logits = base.model(input_ids=ids, attention_mask=torch.ones(1, P + T, dtype=torch.long),
                            position_ids=torch.arange(P, P + T)[None], past_key_values=cache).logits[0]  # (T, V)
        lp = logits.float().log_softmax(-1)
        out.append(sum(float(lp[len(source) - 1 + j, t]) for j, t in enumerate(lab)))
    return out


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])
def test_deep_prompt_scores_equal_hf_forward_over_its_cache(tiny_family, model_root, family):
    if family == "gemma3":
        from softprompt.testing import tiny_base

        base = tiny_base(model_root / "gemma3-deep", "gemma3")
    else:
        base = tiny_family(family)
    pm = PromptedModel(base)
    kv = _deep(base, P=3) * 0.5
    with torch.no_grad():
        ours = label_logprobs(pm, source_state(pm, kv, SOURCES), LABELS)  # (2, 3): padded batch
    for b, src in enumerate(SOURCES):
        torch.testing.assert_close(ours[b], torch.tensor(_hf_label_scores(base, kv, src, LABELS)), atol=1e-4, rtol=1e-4)


def test_deep_init_is_the_input_prompt_it_came_from(tiny):
    """A deep prompt initialised from an input prompt's keys/values scores exactly like that prompt."""
    pm = PromptedModel(tiny)
    prompt = torch.randn(4, tiny.dim, generator=torch.Generator().manual_seed(1))
    kv = deep_init(pm, prompt)
    assert kv.shape == (tiny.kv_layout[0], 2, tiny.kv_layout[1], 4, tiny.kv_layout[2]) and kv.dtype == torch.float32
    with torch.no_grad():
        deep = label_logprobs(pm, source_state(pm, kv, SOURCES), LABELS)
        packed = label_logprobs(pm, source_forward(pm, prompt, SOURCES), LABELS)
    torch.testing.assert_close(deep, packed, atol=1e-4, rtol=1e-4)


def test_deep_prompt_generates_like_the_input_prompt_it_came_from(tiny):
    from softprompt.scoring import generate, generate_after

    pm = PromptedModel(tiny)
    prompt = torch.randn(4, tiny.dim, generator=torch.Generator().manual_seed(2))
    deep = generate_after(pm, source_state(pm, deep_init(pm, prompt), SOURCES), max_new_tokens=6)
    packed = generate(pm, prompt, SOURCES, max_new_tokens=6)
    assert [g.token_ids for g in deep] == [g.token_ids for g in packed] and any(g.token_ids for g in deep)


def _rows() -> list[Row]:
    return [Row(0, [5, 6, 7], 1), Row(1, [8, 9, 10, 11], 0), Row(0, [12, 13], 2), Row(1, [14], 1), Row(2, [15, 16], [30, 31, 2])]


def test_mixed_method_batch_gives_each_row_its_loss_alone(tiny):
    """Task 0: an input prompt (P=3), task 1: a deep prompt (P=5), task 2: a deep prompt (generation)."""
    pm = PromptedModel(tiny)
    prompts = [torch.randn(3, tiny.dim) * 0.5, _deep(tiny, 5, seed=1) * 0.5, _deep(tiny, 2, seed=2) * 0.5]
    label_ids = [LABELS, LABELS, None]
    rows = _rows()
    with torch.no_grad():
        together = row_losses(pm, prompts, rows, label_ids)
        alone = torch.cat([row_losses(pm, prompts, [r], label_ids) for r in rows])
        packed = row_losses(pm, prompts, [rows[0], rows[2]], label_ids, share_prefix=False)  # old path, input prompt
        redirected = row_losses(pm, prompts, rows, label_ids, share_prefix=False)  # deep rows: the prefix path
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(redirected, together, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[[0, 2]], packed, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_deep_prompt_only(tiny):
    pm = PromptedModel(tiny)
    deep = DeepPrompt(_deep(tiny, 4) * 0.5)
    losses = row_losses(pm, [deep(), deep()], [Row(0, [5, 6, 7], 1), Row(1, [8, 9], [30, 2])], [LABELS, None])
    losses.sum().backward()
    assert deep.weight.grad is not None and deep.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


def test_a_deep_prompt_needs_no_model_pass(tiny, monkeypatch):
    """Training on a deep prompt runs the sources only (one decoder pass with single-token labels);
    an input prompt runs its prompt too."""
    pm = PromptedModel(tiny)
    calls = []
    real = pm.decode
    monkeypatch.setattr(pm, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [Row(0, [5, 6, 7], 0), Row(0, [8, 9], 1)]
    row_losses(pm, [_deep(tiny, 4)], rows, [[[20], [21]]])
    assert len(calls) == 1
    row_losses(pm, [torch.randn(4, tiny.dim)], rows, [[[20], [21]]])
    assert len(calls) == 3


@pytest.mark.parametrize("reparam", list(REPARAMS))
def test_collapsed_reparam_prompt_scores_exactly_like_the_training_prompt(tiny, tmp_path, reparam):
    """Under bf16 autocast, as training runs on CPUs with bf16: the file's plain prompt gives
    exactly the losses of the reparameterised prompt it came from."""
    pm = PromptedModel(tiny)
    method = REPARAMS[reparam].method
    module = build_prompt(pm, torch.randn(4, tiny.dim) * 0.5, method, reparam, hidden=16, seed=3)
    with torch.no_grad():  # move away from the init, so the MLP matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = PromptMeta.for_base(tiny, 4, method=method, task="classify", labels=["a", "b", "c"])
    path = save_prompt(tmp_path / "p.safetensors", collapse(module), meta, dtype="float32")
    loaded = load_prompt(path).tensor
    rows = _rows()[:4]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        trained = row_losses(pm, [module(), module()], rows, [LABELS, LABELS])
        saved = row_losses(pm, [loaded, loaded], rows, [LABELS, LABELS])
    assert torch.equal(trained, saved)


def test_reparams_start_at_the_init(tiny):
    """mlp: at the real tokens' keys/values (least-squares fit); residual: at the init prompt itself."""
    pm = PromptedModel(tiny)
    init = torch.randn(5, tiny.dim)
    module = build_prompt(pm, init, "prefix", "mlp", seed=0)
    assert isinstance(module, MLPPrefix)
    torch.testing.assert_close(collapse(module), deep_init(pm, init), atol=1e-4, rtol=1e-3)
    assert torch.equal(collapse(build_prompt(pm, init, "prompt", "residual", seed=0)), init)
    scaled = build_prompt(pm, init, "prefix", "scaled")
    assert isinstance(scaled, ScaledPrefix)
    # kv / s * s: two float32 roundings, each within half an ulp (2^-24 relative)
    torch.testing.assert_close(collapse(scaled), deep_init(pm, init), atol=0, rtol=2 ** -22)


def test_scaled_prefix_steps_each_layer_by_lr_of_its_own_size():
    """Adam's first step moves theta by lr * g / (|g| + eps) per element, so the prefix moves by
    lr times its layer's (and side's) RMS: the same relative step in layers of any size."""
    sizes = torch.tensor([[0.04, 2.0], [0.5, 1.0], [1.4, 3.0]])  # (L, 2): like SmolLM2's values / keys
    module = ScaledPrefix(torch.randn(3, 2, 2, 5, 4) * sizes[:, :, None, None, None])  # (L, 2, H, P, hd)
    before = collapse(module)
    lr = 0.01
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, eps=1e-12)
    module().mul(torch.randn_like(before).sign()).sum().backward()  # |g| of theta = its scale, >= 0.01
    opt.step()
    step = (collapse(module) - before) / module.scale  # (L, 2, H, P, hd)
    torch.testing.assert_close(step.abs(), torch.full_like(step, lr), atol=0, rtol=1e-4)
    moved = (collapse(module) - before).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (L, 2)
    torch.testing.assert_close(moved / before.pow(2).mean(dim=(2, 3, 4)).sqrt(), torch.full_like(moved, lr),
                               atol=0, rtol=1e-4)


@pytest.mark.parametrize("kw, says", [
    ({"method": "prefix", "reparam": "residual"}, "--reparam residual applies to --method prompt, not prefix"),
    ({"reparam": "mlp"}, "--reparam mlp applies to --method prefix, not prompt"),
    ({"reparam_hidden": 64}, "--reparam-hidden needs --reparam"),
    ({"method": "deep"}, "--method 'deep'"),
    ({"reparam": "lora"}, "--reparam 'lora'"),
])
def test_nonsense_combinations_are_one_line_errors(tmp_path, kw, says):
    with pytest.raises(ConfigError, match=says) as e:
        TrainConfig(data=str(tmp_path / "x.jsonl"), **kw)
    assert "\n" not in str(e.value)


def test_cli_refuses_before_loading_a_model(tmp_path, capsys):
    from softprompt.cli import main

    train_file, _ = easy_classification(tmp_path / "d", n_train=8, n_dev=4)
    code = main(["train", "--data", str(train_file), "--out", str(tmp_path / "p.safetensors"), "--model", "/nonexistent",
                 "--method", "prefix", "--reparam", "residual"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--reparam residual applies to --method prompt" in err


def test_sharded_launch_refuses_deep_prompts(tmp_path):
    from softprompt.distributed import LocalRuntime
    from softprompt.distributed.sharding import ShardingConfig

    rt = LocalRuntime()
    rt.world_size, rt.sharding = 2, ShardingConfig(engine="fsdp")
    train_file, _ = easy_classification(tmp_path / "d", n_train=8, n_dev=4)
    c = TrainConfig(data=str(train_file), out=str(tmp_path / "p.safetensors"), batch_size=4, model="/nonexistent",
                    method="prefix")
    with pytest.raises(ConfigError, match="data-parallel \\(DDP\\)"):
        train(c, runtime=rt)


# ----------------------------------------------------------------------------- through train()


@pytest.fixture(scope="module")
def learn(tmp_path_factory, model_root):
    root = tmp_path_factory.mktemp("deep")
    model = learnable_model_dir(model_root / "learnable")
    return root, model, *easy_classification(root / "data", n_train=24, n_dev=6)


def _config(learn, out, **kw) -> TrainConfig:
    root, model, train_file, dev_file = learn
    return TrainConfig(**{"data": str(train_file), "eval": str(dev_file), "model": str(model), "out": str(out),
                          "max_steps": 6, "batch_size": 4, "prompt_length": 3, "lr": 0.03, "eval_every": 3,
                          "patience": None, "checkpoint_every": 2, "prompt_dtype": "float32", "quiet": True, **kw})


@pytest.mark.parametrize("kw", [{"method": "prefix"}, {"method": "prefix", "reparam": "mlp", "lr": 1e-3},
                                {"method": "prefix", "reparam": "scaled", "lr": 0.01}, {"reparam": "residual"}],
                         ids=["prefix", "prefix-mlp", "prefix-scaled", "residual"])
def test_resume_is_bit_exact(learn, monkeypatch, kw):
    from softprompt.train import loop

    root = learn[0] / "-".join(map(str, kw.values()))
    full = train(_config(learn, root / "full.safetensors", **kw))
    real = loop._train_step

    def dies_at_5(run, state, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(run, state, step)

    monkeypatch.setattr(loop, "_train_step", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(_config(learn, root / "cut.safetensors", **kw))
    monkeypatch.setattr(loop, "_train_step", real)
    assert load_checkpoint(root / "cut.run" / "checkpoint.safetensors").step == 4  # resumes mid-run, not from scratch
    resumed = train(_config(learn, root / "cut.safetensors", resume=True, **kw))
    a, b = load_prompt(full.paths["full"]), load_prompt(resumed.paths["cut"])
    assert a.meta.method == b.meta.method == kw.get("method", "prompt")
    assert torch.equal(a.tensor, b.tensor)
    assert [h["loss"] for h in full.history if "loss" in h] == [h["loss"] for h in resumed.history if "loss" in h]


def test_task_file_mixes_methods_and_eval_predict_take_a_deep_prompt(learn, tmp_path):
    import json

    from softprompt.evaluate.compare import EvalConfig, evaluate_file
    from softprompt.predict import PredictConfig, Predictor

    root, model, train_file, dev_file = learn
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"tasks": [
        {"name": "plain", "data": str(train_file), "eval": str(dev_file)},
        {"name": "deep", "data": str(train_file), "eval": str(dev_file), "method": "prefix", "prompt_length": 2}]}))
    r = train(TrainConfig(task_file=str(tasks), model=str(model), out=str(tmp_path / "out"), max_steps=4,
                          batch_size=4, prompt_length=3, lr=0.03, patience=None, prompt_dtype="float32", quiet=True))
    plain, deep = load_prompt(r.paths["plain"]), load_prompt(r.paths["deep"])
    assert plain.meta.method == "prompt" and plain.tensor.shape == (3, 64)
    assert deep.meta.method == "prefix" and deep.tensor.dim() == 5 and deep.meta.length == 2
    res = evaluate_file(EvalConfig(prompt=str(r.paths["deep"]), data=str(dev_file), model=str(model),
                                   baselines=True))
    assert res.results["prompt"]["accuracy"] == r.metrics["deep"]["accuracy"]
    assert "at every layer" in res.results["prompt"]["setup"] and "bare" in res.results
    from softprompt.evaluate.report import write_report

    written = write_report(tmp_path / "report.html", res)
    assert "at every layer: 2 layers x keys/values x 2 kv heads x 16" in written[0].read_text()
    pred = Predictor(PredictConfig(prompt=str(r.paths["deep"]), model=str(model)))
    out = pred.predict(["the match was won by the home team", "shares fell as the market reacted"])
    assert [o["label"] for o in out] and all(abs(sum(o["probs"].values()) - 1) < 1e-4 for o in out)


def test_two_data_parallel_processes_train_a_deep_prompt_like_one(learn, tmp_path):
    """``--method prefix --reparam mlp`` over two gloo processes (Accelerate, plain DDP config) ==
    one process with the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate")
    from softprompt.distributed.launch import free_port

    root, model, train_file, dev_file = learn
    repo = Path(__file__).resolve().parents[1]
    args = ["--data", str(train_file), "--eval", str(dev_file), "--model", str(model), "--max-steps", "4",
            "--batch-size", "4", "--prompt-length", "3", "--lr", "0.001", "--method", "prefix", "--reparam", "mlp",
            "--patience", "none", "--prompt-dtype", "float32", "--precision", "fp32", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = tmp_path / "two.safetensors"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(repo / "configs" / "accelerate" / "data-parallel.yaml"), "--num_processes", "2",
                        "--main_process_port", str(free_port()), "-m", "softprompt", "train", *args, "--out", str(two)],
                       env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = train(_config(learn, tmp_path / "one.safetensors", method="prefix", reparam="mlp", lr=1e-3, max_steps=4,
                        prompt_length=3, precision="fp32", eval_every=None, checkpoint_every=None))
    a, b = load_prompt(two), load_prompt(one.paths["one"])
    assert a.meta.training["processes"] == 2 and a.meta.method == "prefix"
    torch.testing.assert_close(a.tensor, b.tensor, atol=1e-4, rtol=1e-4)


def test_each_method_and_reparam_has_its_own_default_lr(tmp_path):
    data = str(tmp_path / "x.jsonl")
    assert TrainConfig(data=data).lr == TrainConfig(data=data, reparam="residual").lr == 0.1
    assert TrainConfig(data=data, method="prefix").lr == TrainConfig(data=data, method="prefix", reparam="scaled").lr == 0.01
    assert TrainConfig(data=data, method="prefix", reparam="mlp").lr == 1e-3
    assert TrainConfig(data=data, method="prefix", reparam="mlp", lr=0.01).lr == 0.01


def test_gradient_checkpointing_trains_the_same_deep_prompt(learn, tmp_path):
    out = [load_prompt(train(_config(learn, tmp_path / f"gc{gc}.safetensors", method="prefix", max_steps=3,
                                     precision="fp32", gradient_checkpointing=gc, eval_every=None,
                                     checkpoint_every=0)).paths[f"gc{gc}"]).tensor for gc in (False, True)]
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-6)
