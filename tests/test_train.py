"""Training: it learns, only the prompt trains, equivalences (mixed tasks, micro-batches, gradient
checkpointing), the data order, checkpoints, and every bad-input error (before the model loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt import PromptedModel, SoftPrompt, load_base_model, load_prompt
from softprompt.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from softprompt.data import TaskSpec
from softprompt.errors import ConfigError, DataError, SoftpromptError
from softprompt.evaluate import evaluate_prompt
from softprompt.train.objective import Row, row_losses
from softprompt.distributed.batches import shard
from softprompt.train.schedule import epoch_batches, lr_at
from softprompt.train import TaskConfig, TrainConfig, train
from softprompt.train import gradient_checkpointing
from softprompt.train.summary import TrainingSummary
from trainkit import easy_classification, easy_generation, learnable_model_dir, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="session")
def learn_dir(model_root):
    return learnable_model_dir(model_root / "learnable")


@pytest.fixture(scope="session")
def learn(learn_dir):
    return load_base_model(str(learn_dir))


def cfg(tmp_path, data, **kw) -> TrainConfig:
    base = dict(data=None if data is None else str(data), out=str(tmp_path / "out" / "p.safetensors"), max_steps=6, batch_size=8,
                prompt_length=4, lr=0.3, quiet=True, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- it learns


def test_training_learns_an_easy_task(tmp_path, learn, easy):
    train_file, dev_file = easy
    spec = TaskSpec("classify", labels=["business", "sports"])
    from softprompt.data import load_examples

    dev = load_examples(dev_file, "classify")
    init = SoftPrompt.initialize(learn.embedding, learn.tokenizer, 4, "labels", labels=spec.words)
    before = evaluate_prompt(PromptedModel(learn), init.weight.detach(), spec, dev)
    r = train(cfg(tmp_path, train_file, eval=str(dev_file), max_steps=20, eval_every=5, patience=None), base=learn)
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 4
    assert r.metrics["p"]["accuracy"] == 1.0 > before["accuracy"]
    assert r.metrics["p"]["log_loss"] < before["log_loss"] / 10
    saved = load_prompt(r.path, learn)
    again = evaluate_prompt(PromptedModel(learn), saved.tensor, spec, dev)
    assert again["accuracy"] == 1.0
    meta = saved.meta
    assert meta.task == "classify" and meta.labels == ["business", "sports"] and meta.name == "p"
    assert meta.template == spec.template
    t = meta.training
    assert t["steps"] == 20 and t["examples"] == 160 and t["metric"] == "accuracy" and t["best_metric"] == 1.0
    assert t["config"]["lr"] == 0.3 and t["seconds"] > 0 and t["train_examples"] == 48
    # the stored format: these keys (TrainingSummary writes them; files of older versions have them)
    assert sorted(t) == sorted(["steps", "planned_steps", "examples", "train_examples", "dev_examples", "train_file",
                       "dev_file", "best_step", "metric", "best_metric", "dev_metrics", "stopped_early", "stopped_by",
                       "max_time", "seconds", "examples_per_s", "processes", "precision", "tasks_in_run", "config",
                       "balance", "gradient_checkpointing", "calibrated"])
    summary = TrainingSummary.from_meta(t)
    assert summary.to_meta() == t and summary.best_step == t["best_step"] and summary.stopped_by is None


def test_generation_training_lowers_target_loss(tmp_path, learn):
    data = easy_generation(tmp_path)
    r = train(cfg(tmp_path, data, task="generate", max_steps=12, lr=0.3), base=learn)
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    meta = load_prompt(r.path, learn).meta
    assert meta.task == "generate" and meta.template == "Input: {input}\nOutput:" and meta.labels is None


def test_only_the_prompt_gets_gradients(tiny):
    pm = PromptedModel(tiny)
    tok = tiny.tokenizer
    spec = TaskSpec("classify", labels=["sports", "business politics"])
    gspec = TaskSpec("generate")
    p1 = SoftPrompt.initialize(tiny.embedding, tok, 3, "vocab")
    p2 = SoftPrompt.initialize(tiny.embedding, tok, 5, "vocab", seed=1)
    rows = [Row(0, spec.source_ids(tok, "shares fell"), 1),
            Row(1, gspec.source_ids(tok, "the match"), gspec.target_ids(tok, "won"))]
    losses = row_losses(pm, [p1.weight, p2.weight], rows, [spec.label_ids(tok), None])
    losses.sum().backward()
    assert p1.weight.grad.abs().sum() > 0 and p2.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


# ----------------------------------------------------------------------------- equivalences


def _mixed_setup(base):
    tok = base.tokenizer
    specs = [TaskSpec("classify", labels=["sports", "business politics", "film"]),
             TaskSpec("classify", template="Review: {text}\nSentiment:", labels=["positive", "negative"]),
             TaskSpec("generate")]
    prompts = [SoftPrompt.initialize(base.embedding, tok, n, "vocab", seed=n).weight for n in (3, 6, 2)]
    texts = ["the match was won by the home team", "shares fell", "a new phone with a faster chip",
             "i loved this movie", "it was awful", "the minister said the election would be held"]
    rows = [Row(0, specs[0].source_ids(tok, texts[0]), 0), Row(1, specs[1].source_ids(tok, texts[3]), 0),
            Row(2, specs[2].source_ids(tok, texts[5]), specs[2].target_ids(tok, "election next spring")),
            Row(0, specs[0].source_ids(tok, texts[1]), 1), Row(1, specs[1].source_ids(tok, texts[4]), 1),
            Row(0, specs[0].source_ids(tok, texts[2]), 2),
            Row(2, specs[2].source_ids(tok, texts[1]), specs[2].target_ids(tok, "shares"))]
    label_ids = [s.label_ids(tok) if s.kind == "classify" else None for s in specs]
    return prompts, rows, label_ids


def _grads(pm, prompts, rows, label_ids):
    for p in prompts:
        p.grad = None
    losses = row_losses(pm, prompts, rows, label_ids)
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in prompts]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_task_batch_equals_separate_batches(tiny_family, family):
    base = tiny_family(family)
    pm = PromptedModel(base)
    prompts, rows, label_ids = _mixed_setup(base)
    assert max(len(l) for l in label_ids[0]) > 1  # multi-token labels: the cached continuation runs
    mixed_loss, mixed_grads = _grads(pm, prompts, rows, label_ids)
    sep_loss = torch.empty_like(mixed_loss)
    sep_grads = [torch.zeros_like(p) for p in prompts]
    for t in range(3):
        idx = [i for i, r in enumerate(rows) if r.task == t]
        loss, grads = _grads(pm, prompts, [rows[i] for i in idx], label_ids)
        sep_loss[idx] = loss
        for g, s in zip(grads, sep_grads):
            s += g
    torch.testing.assert_close(mixed_loss, sep_loss, atol=1e-5, rtol=1e-4)
    for m, s in zip(mixed_grads, sep_grads):
        torch.testing.assert_close(m, s, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_shared_prompt_prefix_equals_the_packed_forward(tiny_family, family):
    """Each prompt run once per batch (its keys/values shared by its rows) == prompt packed into every row."""
    base = tiny_family(family)
    pm = PromptedModel(base)
    prompts, rows, label_ids = _mixed_setup(base)
    res = []
    for share in (False, True):
        for p in prompts:
            p.grad = None
        losses = row_losses(pm, prompts, rows, label_ids, share_prefix=share)
        losses.sum().backward()
        res.append((losses.detach(), [p.grad.clone() for p in prompts]))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_linear_weights_cast_once_equal_autocast(tiny_family):
    """bf16 Linear weights held for the run give exactly autocast's numbers; fp32 restored after."""
    from softprompt.train import cast_linear_weights

    base = tiny_family("qwen2")  # untied lm head, biases on q/k/v
    pm = PromptedModel(base)
    prompts, rows, label_ids = _mixed_setup(base)
    before = {n: p.clone() for n, p in base.model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain = _grads(pm, prompts, rows, label_ids)
        with cast_linear_weights(base.model, torch.bfloat16):
            assert base.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            cast_loss, cast = _grads(pm, prompts, rows, label_ids)
    assert torch.equal(plain_loss, cast_loss)
    for a, b in zip(plain, cast):
        assert torch.equal(a, b)
    for n, p in base.model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_attention_switch_is_restored(tiny):
    from softprompt.train import attention_implementation

    before = tiny.model.config._attn_implementation
    with attention_implementation(tiny.model, "eager"):
        assert tiny.model.config._attn_implementation == "eager"
    assert tiny.model.config._attn_implementation == before


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_family, family, monkeypatch):
    import softprompt.hf_compat as train_mod

    base = tiny_family(family)
    pm = PromptedModel(base)
    prompts, rows, label_ids = _mixed_setup(base)
    plain_loss, plain = _grads(pm, prompts, rows, label_ids)
    calls = []
    real = train_mod._checkpoint_with_cache
    monkeypatch.setattr(train_mod, "_checkpoint_with_cache", lambda f, *a: calls.append(1) or real(f, *a))
    with gradient_checkpointing(base.model, True):
        ck_loss, ck = _grads(pm, prompts, rows, label_ids)
    # every layer checkpointed in the source pass, each task's label continuation, the generation pass
    n = base.model.config.num_hidden_layers
    assert len(calls) % n == 0 and len(calls) >= 3 * n
    torch.testing.assert_close(plain_loss, ck_loss)
    for a, b in zip(plain, ck):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.model.modules())
    assert not any(m.training for m in base.model.modules())  # left as it was: eval mode


def test_micro_batches_give_the_same_prompt(tmp_path, learn, easy):
    a = train(cfg(tmp_path / "a", easy[0], max_steps=4), base=learn)
    b = train(cfg(tmp_path / "b", easy[0], max_steps=4, grad_accum=4), base=learn)
    pa, pb = load_prompt(a.path).tensor, load_prompt(b.path).tensor
    torch.testing.assert_close(pa, pb, atol=2e-3, rtol=0)  # float16 storage; same batches, same sums
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-4)


def test_seeded_runs_are_reproducible(tmp_path, learn, easy):
    a = train(cfg(tmp_path / "a", easy[0], max_steps=3, prompt_dtype="float32"), base=learn)
    b = train(cfg(tmp_path / "b", easy[0], max_steps=3, prompt_dtype="float32"), base=learn)
    c = train(cfg(tmp_path / "c", easy[0], max_steps=3, prompt_dtype="float32", seed=1), base=learn)
    assert torch.equal(load_prompt(a.path).tensor, load_prompt(b.path).tensor)
    assert not torch.equal(load_prompt(a.path).tensor, load_prompt(c.path).tensor)


# ----------------------------------------------------------------------------- several tasks


def test_task_file_trains_one_prompt_per_task(tmp_path, learn):
    t1, d1 = easy_classification(tmp_path / "topic")
    t2, _ = easy_classification(tmp_path / "other", labels=("finance", "games"), seed=1)
    gen = easy_generation(tmp_path / "gen")
    tasks = {"tasks": [
        {"name": "topic", "data": "topic/train.jsonl", "eval": "topic/dev.jsonl"},
        {"name": "other", "data": "other/train.jsonl", "template": "Item: {text}\nKind:", "prompt_length": 6,
         "verbalizer": {"finance": "money"}},
        {"name": "gen", "data": "gen/gen.jsonl", "task": "generate"},
    ]}
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    r = train(TrainConfig(task_file=str(tmp_path / "tasks.json"), out=str(tmp_path / "prompts"), max_steps=4,
                          prompt_length=4, quiet=True, batch_size=8), base=learn)
    assert set(r.paths) == {"topic", "other", "gen"}
    assert r.run_dir == tmp_path / "prompts" / "run"
    metas = {n: load_prompt(p, learn).meta for n, p in r.paths.items()}
    assert metas["topic"].labels == ["business", "sports"] and metas["topic"].length == 4
    assert metas["other"].verbalizer == {"finance": "money"} and metas["other"].length == 6
    assert metas["other"].template == "Item: {text}\nKind:"
    assert metas["gen"].task == "generate"
    assert metas["topic"].training["tasks_in_run"] == 3 and "accuracy" in metas["topic"].training["dev_metrics"]
    assert all(p.parent == tmp_path / "prompts" for p in r.paths.values())
    # tasks without a dev set save their trained prompt (not their initialisation) even when
    # another task of the run has one: one step less gives other prompts
    r1 = train(TrainConfig(task_file=str(tmp_path / "tasks.json"), out=str(tmp_path / "p1"), max_steps=3,
                           prompt_length=4, quiet=True, batch_size=8), base=learn)
    for name in ("other", "gen"):
        assert not torch.equal(load_prompt(r.paths[name]).tensor, load_prompt(r1.paths[name]).tensor), name


# ----------------------------------------------------------------------------- data order, lr


def test_epoch_batches_are_seeded_complete_and_grouped_by_length():
    lengths = [(i * 37) % 200 + 5 for i in range(100)]
    a = epoch_batches(lengths, 8, seed=0, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=0, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=0, epoch=1) and a != epoch_batches(lengths, 8, seed=1, epoch=0)
    flat = [i for b in a for i in b]
    assert len(a) == 12 and all(len(b) == 8 for b in a) and len(set(flat)) == 96
    pad = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in a)
    rand = [list(range(100))[k : k + 8] for k in range(0, 96, 8)]
    pad_random = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in rand)
    assert pad < pad_random / 3


def test_shard_splits_a_batch_over_processes_and_micro_batches():
    batch = list(range(12))
    parts = [shard(batch, 2, r, 3) for r in range(2)]
    assert parts[0] == [[0, 2], [4, 6], [8, 10]] and parts[1] == [[1, 3], [5, 7], [9, 11]]
    assert sorted(i for p in parts for m in p for i in m) == batch


def test_lr_schedule_warms_up_and_decays():
    lrs = [lr_at(s, 100, 0.1, 10) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001
    assert lr_at(50, 100, 0.1, 0, "constant") == 0.1


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_atomic_write(tmp_path, monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(4, 8)
    opt.step()
    st = TrainState(step=7, names=["a"], prompts=[p.detach()], best_prompts=[p.detach() * 2],
                    optimizer=opt.state_dict(), rng={"cpu": torch.get_rng_state()}, info={"examples": 56})
    path = tmp_path / "run" / "checkpoint.safetensors"
    save_checkpoint(path, st)
    back = load_checkpoint(path)
    assert back.step == 7 and back.info == {"examples": 56} and torch.equal(back.prompts[0], p.detach())
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 8))], lr=0.1)
    opt2.load_state_dict(back.optimizer)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    st.step = 8
    with pytest.raises(OSError):
        save_checkpoint(path, st)
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert [f.name for f in path.parent.iterdir()] == ["checkpoint.safetensors"]  # no temp file left


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, easy):
    run = tmp_path / "out" / "p.run"
    run.mkdir(parents=True)
    (run / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable softprompt checkpoint"):
        train(cfg(tmp_path, easy[0], resume=True, model="/nonexistent"))


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, name: str):
    """(config kwargs, expected message) for each bad input."""
    d = tmp_path / "d"
    good = write_jsonl(d / "good.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    cases = {
        "missing file": ({"data": str(d / "nope.jsonl")}, "no such data file"),
        "malformed json": ({"data": str(_lines(d / "m.jsonl", '{"text": "a", "label": "x"}\n{oops\n'))},
                           "m.jsonl:2: malformed JSON"),
        "missing field": ({"data": str(write_jsonl(d / "f.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}]))},
                          "f.jsonl:2: missing field 'label'"),
        "single class": ({"data": str(write_jsonl(d / "s.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(9)]))},
                         "single class"),
        "unseen eval label": ({"data": str(good), "eval": str(write_jsonl(d / "e.jsonl", [{"text": "q", "label": "zz"}]))},
                              "e.jsonl:1: label 'zz' never seen in training"),
        "label not in --labels": ({"data": str(good), "labels": ["a", "c"]}, "not in the label set"),
        "template": ({"data": str(good), "template": "no placeholder"}, "must contain {text}"),
        "verbalizer": ({"data": str(good), "verbalizer": "q=words"}, "unknown label"),
        "batch larger than data": ({"data": str(good), "batch_size": 16}, "--batch-size 16 is larger than the training set"),
        "task file key": ({"data": None, "task_file": str(_lines(d / "t.json", '{"tasks": [{"name": "a", "data": "x", "colour": 1}]}'))},
                          "unknown key"),
        "resume without checkpoint": ({"data": str(good), "resume": True}, "no checkpoint"),
    }
    return cases[name]


def _lines(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD = ["missing file", "malformed json", "missing field", "single class", "unseen eval label", "label not in --labels",
       "template", "verbalizer", "batch larger than data", "task file key", "resume without checkpoint"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_the_model_loads(tmp_path, case):
    kw, msg = _bad(tmp_path, case)
    # A model path that does not exist: an error about data must come before any model load.
    with pytest.raises(SoftpromptError, match=msg.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        train(cfg(tmp_path, **{"data": None, **kw}, model="/nonexistent/model"))
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("kw, flag", [
    ({"lr": 0}, "--lr"), ({"batch_size": 0}, "--batch-size"), ({"grad_accum": 3}, "--grad-accum"),
    ({"max_steps": 3, "epochs": 1}, "--max-steps or --epochs"), ({"precision": "fp8"}, "--precision"),
    ({"init": "magic"}, "--init"), ({"init": "text"}, "--init-text"), ({"warmup": 2.5}, "--warmup"),
    ({"patience": 0}, "--patience"), ({"schedule": "step"}, "--schedule"), ({"classify_loss": "hinge"}, "--classify-loss"),
    ({"eval": "x.jsonl", "eval_split": 0.1}, "--eval or --eval-split"), ({"eval_split": 1.5}, "--eval-split"),
    ({"max_length": 4}, "--max-length"), ({"prompt_length": 0}, "--prompt-length"), ({"attention": "x"}, "--attention"),
])
def test_bad_flags_name_the_flag(tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-")):
        cfg(tmp_path, "x.jsonl", **kw)


def test_fp16_on_cpu_is_refused(tmp_path, easy):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(cfg(tmp_path, easy[0], precision="fp16", device="cpu", model="/nonexistent"))


# ----------------------------------------------------------------------------- command line


def _cli(*args, env_extra=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_train_help():
    r = _cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--task-file", "--eval-split", "--max-steps", "--precision", "--gradient-checkpointing",
                 "--resume", "--quiet", "--patience", "--verbalizer", "--run-dir"):
        assert flag in r.stdout


def test_cli_quiet_prints_nothing_and_writes_the_prompt(tmp_path, learn_dir, easy):
    out = tmp_path / "o" / "topic.safetensors"
    r = _cli("train", "--data", str(easy[0]), "--eval", str(easy[1]), "--model", str(learn_dir), "--out", str(out),
             "--max-steps", "3", "--prompt-length", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    assert out.is_file() and (tmp_path / "o" / "topic.run" / "metrics.jsonl").is_file()
    loaded = load_prompt(out)
    assert loaded.meta.name == "topic" and loaded.meta.training["steps"] == 3


def test_cli_error_is_one_line(tmp_path):
    r = _cli("train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.safetensors"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such data file" in lines[0] and lines[0].startswith("softprompt train: error:")


@pytest.mark.real_model
def test_two_steps_on_the_default_model(tmp_path, default_base):
    """The real path on SmolLM2: label init, bf16 autocast where the CPU has it, a prompt file for it."""
    from softprompt.train import cpu_has_fast_bf16

    rows = [{"text": t, "label": l} for t, l in [
        ("Shares fell after the central bank raised rates.", "business"), ("The striker scored twice.", "sport"),
        ("Profits rose at the carmaker.", "business"), ("The team won the cup final.", "sport")] * 2]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = train(TrainConfig(data=str(data), out=str(tmp_path / "p.safetensors"), max_steps=2, batch_size=4,
                          max_length=32, template="Text: {text}\nTopic:", quiet=True), base=default_base)
    loaded = load_prompt(r.path, default_base)
    assert loaded.meta.length == 20 and loaded.meta.labels == ["business", "sport"]
    assert loaded.meta.training["precision"] == ("bfloat16" if cpu_has_fast_bf16() else "fp32")
    assert all(h["loss"] < 5 for h in r.history if "loss" in h)  # label init: the labels are likely from step 1


def test_the_prompt_prefix_is_shared_on_a_cpu_and_packed_on_a_gpu():
    from softprompt.train.speed import share_prompt_prefix

    assert share_prompt_prefix(torch.device("cpu")) is True  # compute-bound: the prompt's tokens once per batch
    assert share_prompt_prefix(torch.device("cuda", 0)) is False  # launch-bound: one pass fewer
