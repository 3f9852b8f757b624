"""Shared helpers of the training tests: a tiny model a prompt can steer, and easy data sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPORTS = ["the match was won by the home team", "the home team won the match in extra time", "sports match won"]
BUSINESS = ["shares fell as the market reacted", "the central bank decision on the interest rate",
            "market shares fell"]


def learnable_model_dir(path: Path) -> Path:
    """A tiny random Llama whose weights are large enough (init std 0.2) for a 4-token prompt to
    steer it: the default tiny test model is near-saturated and barely responds to a prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.testing import tiny_config, tiny_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def easy_classification(folder: Path, n_train: int = 48, n_dev: int = 12, seed: int = 0,
                        labels: tuple[str, str] = ("business", "sports")) -> tuple[Path, Path]:
    """Two classes told apart by their (few, distinct) texts: train.jsonl and dev.jsonl."""
    r = random.Random(seed)

    def rows(n):
        return [{"text": r.choice(SPORTS if i % 2 else BUSINESS), "label": labels[i % 2]} for i in range(n)]

    return write_jsonl(folder / "train.jsonl", rows(n_train)), write_jsonl(folder / "dev.jsonl", rows(n_dev))


def easy_generation(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """Input -> output pairs where the output is the input's first two words."""
    r = random.Random(seed)
    texts = SPORTS + BUSINESS
    rows = []
    for _ in range(n):
        t = r.choice(texts)
        rows.append({"input": t, "output": " ".join(t.split()[:2])})
    return write_jsonl(folder / "gen.jsonl", rows)
