"""--memory-budget: the activation estimate (pure), the decision (pure), and a run that switches
gradient checkpointing on by itself when its budget is small."""

from __future__ import annotations

import pytest

from softprompt import load_prompt
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from softprompt.train.memory import GB, StepShape, activation_bytes, choose_checkpointing, parse_budget
from trainkit import easy_classification, learnable_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = dict(layers=30, hidden=576, heads=9, intermediate=1536, vocab=49152)  # SmolLM2-135M's shape


def test_estimate_grows_with_batch_and_length_and_falls_with_checkpointing():
    small = activation_bytes(StepShape(8, 180, 1), **DIMS)
    assert activation_bytes(StepShape(16, 180, 1), **DIMS) > 1.9 * small  # linear in rows (+ the head)
    assert activation_bytes(StepShape(8, 360, 1), **DIMS) > 2 * small  # attention scores: faster than linear
    assert activation_bytes(StepShape(8, 180, 1), **DIMS, checkpointed=True) < small / 5
    assert activation_bytes(StepShape(8, 180, 20), **DIMS) > small  # more label-tree tokens under the lm head
    assert activation_bytes(StepShape(8, 180, 1), **DIMS, elem_bytes=2) < small


def test_parse_budget_and_choice():
    assert parse_budget("auto") is None and parse_budget(None) is None and parse_budget("none") == float("inf")
    assert parse_budget("6GB") == 6 * GB and parse_budget("512mb") == 512 * 1024**2 and parse_budget("2.5") == 2.5 * GB
    for bad in ("-1GB", "0", "lots"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert choose_checkpointing(True, 0, 1) == (True, None)
    assert choose_checkpointing(False, 10, 100) == (False, None)
    on, why = choose_checkpointing(False, 3 * GB, 2 * GB)
    assert on and "3.0 GB" in why and "--memory-budget of 2.0 GB" in why


def test_bad_budget_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--memory-budget 'lots'"):
        TrainConfig(data="x.jsonl", out=str(tmp_path / "p.safetensors"), memory_budget="lots")


def test_a_small_budget_switches_checkpointing_on(tmp_path, model_root, capsys):
    model = learnable_model_dir(model_root / "learnable")
    data, _ = easy_classification(tmp_path / "data", n_train=8, n_dev=4)
    kw = dict(data=str(data), model=str(model), batch_size=4, max_steps=2, prompt_length=4, checkpoint_every=0)
    # the step's estimate is 1.59 MB at 4-byte activations (fp32) and 0.86 MB at 2 (bf16 autocast, which
    # --precision auto picks on a CPU with native bf16): a budget of 1 MB sat between and failed there
    r = train(TrainConfig(out=str(tmp_path / "a" / "p.safetensors"), memory_budget="0.25MB", **kw))
    assert load_prompt(r.path).meta.training["gradient_checkpointing"] is True
    assert "gradient checkpointing on: a step's activations need" in capsys.readouterr().err
    r = train(TrainConfig(out=str(tmp_path / "b" / "p.safetensors"), memory_budget="none", **kw))
    assert load_prompt(r.path).meta.training["gradient_checkpointing"] is False
