"""The sharded frozen base, in one process: layers freed after their forward and gathered again in
backward give the unsharded gradients (through rank classification's KV cache too), bf16 compute
weights equal autocast's casts, the model comes back unchanged; micro-batches in lockstep (pure).
Two real processes: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from softprompt.distributed import LocalRuntime
from softprompt.errors import ConfigError
from softprompt.model import PromptedModel
from softprompt.train.objective import Row, row_losses
from softprompt.distributed.batches import shard
from softprompt.distributed.sharding import ShardedLayers, ShardingConfig, lockstep_micro_batches
from softprompt.train import cast_linear_weights


def test_lockstep_micro_batches_give_every_process_the_same_tasks():
    task_of = [0, 0, 0, 1, 1, 2, 0, 0]
    batch = [0, 1, 2, 3, 4, 5, 6, 7]
    for world, micro in [(2, 1), (2, 2), (4, 1), (1, 2)]:
        per_rank = [lockstep_micro_batches(batch, task_of, world, r, micro) for r in range(world)]
        for r, mbs in enumerate(per_rank):
            assert [rows[:own] for rows, own in mbs] == shard(batch, world, r, micro)  # own rows first, unchanged
        for m in range(micro):
            tasks = [{task_of[i] for i in per_rank[r][m][0]} for r in range(world)]
            assert all(t == tasks[0] for t in tasks)
            assert len(set().union(*tasks)) == len({task_of[i] for r in range(world) for i in per_rank[r][m][0]})
    assert lockstep_micro_batches(batch, [0] * 8, 2, 1, 2) == [([1, 3], 2), ([5, 7], 2)]  # one task: nothing borrowed
    # rank 0 holds rows 0, 3 (tasks 0, 1), rank 1 rows 1, 5 (tasks 0, 2): each borrows the other's extra task
    assert lockstep_micro_batches([0, 1, 3, 5], task_of, 2, 0, 1) == [([0, 3, 5], 2)]
    assert lockstep_micro_batches([0, 1, 3, 5], task_of, 2, 1, 1) == [([1, 5, 3], 2)]


def _batch(base):
    tok = base.tokenizer
    labels = [[tok(" business news").input_ids, tok(" sports").input_ids], None]  # a multi-token label: label pass
    rows = [Row(0, tok("the match was won").input_ids, 1), Row(1, tok("the").input_ids, tok(" match won").input_ids),
            Row(0, tok("shares fell as the market").input_ids, 0)]
    return rows, labels


def _grads(base, amp=None):
    torch.manual_seed(0)
    prompts = [torch.nn.Parameter(torch.randn(3, base.dim)) for _ in range(2)]
    rows, labels = _batch(base)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = row_losses(PromptedModel(base), prompts, rows, labels).sum()
    loss.backward()
    return [p.grad for p in prompts]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma"])
def test_sharded_layers_are_freed_after_forward_and_gathered_again_in_backward(tiny_family, family):
    base = tiny_family(family)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    want = _grads(base)
    s = ShardedLayers(base.model, LocalRuntime(), ShardingConfig(), restore=True)
    layers = list(base.model.base_model.h if family == "gpt2" else base.model.model.layers)
    assert len(s.units) == len(layers) and all(p.numel() == 0 for p in layers[0].parameters())
    with s:
        got = _grads(base)
        held = [u for u in s.units if any(p.numel() for p in u.module.parameters())]
        assert len(held) <= 1  # after backward: at most the last layer it gathered
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    # forward: 5 decoder runs (2 prompt prefixes, source, labels, generation) x layers; backward: the same again
    assert s.gathers == 2 * 5 * len(layers)
    assert s.local_bytes() == s.full_bytes and s.sharded_bytes() < s.full_bytes
    after = dict(base.model.named_parameters())
    assert all(torch.equal(after[n], b) for n, b in before.items())  # restored


def test_bf16_compute_weights_equal_autocast_casts(tiny_family):
    base = tiny_family("llama")
    with cast_linear_weights(base.model, torch.bfloat16):
        want = _grads(base, torch.bfloat16)
    with ShardedLayers(base.model, LocalRuntime(), compute_dtype=torch.bfloat16, restore=True):
        got = _grads(base, torch.bfloat16)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert all(p.dtype == torch.float32 and p.numel() for p in base.model.parameters())


def test_unknown_layer_class_is_refused(tiny_family):
    with pytest.raises(ConfigError, match="no module of class NoSuchLayer"):
        ShardedLayers(tiny_family("llama").model, LocalRuntime(), ShardingConfig(layer_classes=("NoSuchLayer",)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_empty_weights_load_is_the_skeleton_process_0_fills(tiny_family, family):
    """FSDP cpu_ram_efficient_loading: the processes other than 0 build the model with meta
    parameters and real buffers; filled with process 0's weights it is the same model."""
    from softprompt import load_base_model
    from softprompt.distributed.sharding import materialize

    real = tiny_family(family)
    empty = load_base_model(real.model.name_or_path, empty=True)
    assert all(p.is_meta for p in empty.model.parameters()) and not any(b.is_meta for b in empty.model.buffers())
    assert empty.fingerprint == "" and empty.sketch == []
    shapes = lambda m: [(n, p.shape, p.dtype) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(empty.model) == shapes(real.model)  # tied embeddings stay one parameter
    for (n, b), (_, want) in zip(empty.model.named_buffers(), real.model.named_buffers()):
        torch.testing.assert_close(b, want, atol=0, rtol=0, msg=n)
    materialize(empty.model, lambda p: torch.empty(p.shape, dtype=p.dtype))
    src = dict(real.model.named_parameters())
    with torch.no_grad():
        for n, p in empty.model.named_parameters():
            p.copy_(src[n])
    empty.refingerprint()
    assert empty.fingerprint == real.fingerprint
    for g, w in zip(_grads(empty), _grads(real)):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
