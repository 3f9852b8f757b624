"""--init-from: a run starts from another trained prompt of the same base (prompt transfer); one-line
errors for a missing file, another base, another method or another length."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptMeta, load_prompt, save_prompt
from softprompt.errors import ConfigError
from softprompt.train import TrainConfig, train
from trainkit import easy_classification

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp_path, data, name, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp_path / f"{name}.safetensors"), max_steps=3, batch_size=8,
                prompt_length=4, lr=0.3, quiet=True, precision="fp32", prompt_dtype="float32", checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_run_starts_from_the_given_prompt(tmp_path, learn, method):
    train_file, _ = easy_classification(tmp_path / "data")
    source = train(cfg(tmp_path, train_file, "src", method=method), base=learn).path
    start = load_prompt(source).tensor
    moved = train(cfg(tmp_path, train_file, "t", method=method, init_from=str(source), lr=1e-9, max_steps=1,
                      warmup=0), base=learn)
    got = load_prompt(moved.path).tensor
    torch.testing.assert_close(got, start, rtol=0, atol=1e-6)  # one AdamW step of 1e-9 moves it by ~1e-9
    fresh = load_prompt(train(cfg(tmp_path, train_file, "f", method=method, lr=1e-9, max_steps=1, warmup=0),
                              base=learn).path).tensor
    assert (fresh - start).abs().max() > 1e-3
    assert load_prompt(moved.path).meta.training["config"]["init_from"] == str(source)


def test_mismatches_are_one_line_errors(tmp_path, learn, tiny):
    train_file, _ = easy_classification(tmp_path / "data")
    source = train(cfg(tmp_path, train_file, "src"), base=learn).path
    cases = [
        (dict(init_from=str(tmp_path / "nope.safetensors")), "--init-from: no such prompt file"),
        (dict(init_from=str(source), prompt_length=5), "holds 4 virtual tokens; --prompt-length is 5"),
        (dict(init_from=str(source), method="prefix"), "holds a prompt prompt; this run trains --method prefix"),
    ]
    other = save_prompt(tmp_path / "other.safetensors", torch.zeros(4, learn.dim),
                        PromptMeta.for_base(learn, 4, task="classify", labels=["a", "b"]))
    meta = load_prompt(other).meta
    meta.fingerprint = "0" * len(meta.fingerprint)  # another base model of the same width
    save_prompt(other, torch.zeros(4, learn.dim), meta)
    cases.append((dict(init_from=str(other)), "--init-from"))
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            train(cfg(tmp_path, train_file, "x", **kw), base=learn)
        assert "\n" not in str(e.value)
