"""DeepSpeed ZeRO-3 partitioning of the frozen base in two real gloo processes (this file runs
itself under torch.distributed.run): gradients through the partitioned layers (through rank
classification's KV cache too) equal the unpartitioned ones, each process holds half of every
layer, and the model comes back unchanged. Reading the DeepSpeed config (pure). End to end through
``accelerate launch``: tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt.distributed import accelerate_precision, deepspeed_config, deepspeed_note, sharding_config
from softprompt.errors import ConfigError
from softprompt.distributed.sharding.zero3 import zero_section

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # partition even tiny weights


def _worker(model_dirs: list[str]) -> None:
    """Run by each of the two processes: every process loads the model and keeps its partition,
    then (zero3_init_flag) process 0 loads it and process 1 builds it empty and receives its part."""
    from softprompt import load_base_model
    from softprompt.distributed import AccelerateRuntime, shutdown
    from softprompt.distributed.sharding import ShardingConfig, shard_base
    from test_sharding import _grads

    torch.set_num_threads(1)
    rt = AccelerateRuntime("cpu")
    for d in model_dirs:
        base = load_base_model(d)
        before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
        full = sum(p.numel() * p.element_size() for p in base.model.parameters())
        want = _grads(base)
        z = shard_base(base.model, rt, ShardingConfig(engine="zero3", deepspeed=ZERO3), restore=True)
        layers = z.units
        assert all(p.numel() == 0 for p in layers[0].parameters())  # partitioned: nothing gathered between calls
        held = z.local_bytes()
        layer_bytes = z.sharded_bytes()
        assert abs(held - (full - layer_bytes / 2)) <= 64 * len(before), (held, full, layer_bytes)
        with z:
            for _ in range(2):  # a second step replays DeepSpeed's recorded trace (prefetching)
                got = _grads(base)
                z.end_step()
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
                assert all(p.numel() == 0 for m in layers for p in m.parameters())  # freed after the step
        after = dict(base.model.named_parameters())
        assert all(torch.equal(after[n], b) for n, b in before.items())  # restored, plain parameters again
        assert not any(k.startswith("ds_") for p in base.model.parameters() for k in vars(p))
        torch.testing.assert_close(_grads(base)[0], want[0])

        base = load_base_model(d, empty=rt.rank != 0)
        assert all(p.is_meta for p in base.model.parameters()) == (rt.rank != 0)
        with shard_base(base.model, rt, ShardingConfig(engine="zero3", deepspeed=ZERO3, efficient_loading=True)) as z:
            assert abs(z.local_bytes() - held) <= 64 * len(before)
            base.refingerprint()
            got = _grads(base)
            z.end_step()
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    print(f"rank {rt.rank} ok", flush=True)
    shutdown()  # as `softprompt train` ends: no abort at exit (a DeepSpeed quirk, see shutdown)


@pytest.mark.parametrize("families", [("llama", "gpt2")])
def test_zero3_partitioned_layers_give_the_unpartitioned_gradients(tiny_family, families, tmp_path):
    pytest.importorskip("deepspeed")
    from softprompt.distributed.launch import free_port

    dirs = [str(tiny_family(f).model.name_or_path) for f in families]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")])}  # this checkout's softprompt
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), __file__, *dirs], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count(" ok") == 2, (r.stdout + r.stderr)[-4000:]


# ----------------------------------------------------------------------------- the DeepSpeed config


def test_zero_section_resolves_auto_like_transformers():
    zero = zero_section({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                               "stage3_param_persistence_threshold": "auto", "sub_group_size": "auto",
                                               "overlap_comm": True}}, hidden=64)
    assert zero == {"stage": 3, "stage3_prefetch_bucket_size": int(0.9 * 64 * 64),
                    "stage3_param_persistence_threshold": 640, "overlap_comm": True}


def _ds_env(monkeypatch, **env):
    for var in [v for v in os.environ if v.startswith("ACCELERATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_accelerate_deepspeed_fields(monkeypatch):
    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu",
            ACCELERATE_DEEPSPEED_ZERO3_INIT="false")
    s = sharding_config()
    assert s.engine == "zero3" and s.deepspeed == {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert "partitioned" in s.describe()
    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    assert sharding_config() is None  # ZeRO-2: data parallel
    assert "ZeRO-2: data parallel" in deepspeed_note(deepspeed_config())
    _ds_env(monkeypatch)
    assert deepspeed_config()["zero_optimization"]["stage"] == 2  # accelerate's default stage
    assert not s.efficient_loading
    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_ZERO3_INIT="true")
    assert sharding_config().efficient_loading  # process 0 reads the checkpoint


def test_deepspeed_json_file(monkeypatch, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ZERO3, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": "auto"}))
    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path))
    assert sharding_config().deepspeed["zero_optimization"] == ZERO3["zero_optimization"]
    assert accelerate_precision() == "bf16"
    note = deepspeed_note(deepspeed_config())
    assert note.endswith("not the DeepSpeed config: optimizer, train_micro_batch_size_per_gpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate's own setting wins
    assert accelerate_precision() == "fp16"
    for text, says in [('{"zero_optimization": {"stage": 3},\n  "bf16": }', r"ds.json, line 2: not valid JSON"),
                       ('[1, 2]', "must be a JSON object"),
                       ('{"zero_optimization": {"stage": 4}}', r"stage must be 0, 1, 2 or 3 \(got 4\)")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=says) as e:
            sharding_config()
        assert "\n" not in str(e.value)
    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="missing.json: cannot read it"):
        sharding_config()


def test_invalid_zero_settings_are_one_line_errors(tiny_family):
    pytest.importorskip("deepspeed")
    from softprompt.distributed import LocalRuntime
    from softprompt.distributed.sharding import ShardingConfig, shard_base

    bad = {"zero_optimization": {"stage": 3, "offload_param": {"device": "floppy"}}}
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 config: .*offload_param") as e:
        shard_base(tiny_family("llama").model, LocalRuntime(), ShardingConfig(engine="zero3", deepspeed=bad))
    assert "\n" not in str(e.value)


if __name__ == "__main__":
    _worker(sys.argv[1:])
