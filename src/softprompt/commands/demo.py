"""``softprompt demo``: the README's first command, on the embedded default model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..artifact import PromptMeta, load_prompt, save_prompt
from ..base import load_base_model
from ..model import PromptedModel
from ..prompt import SoftPrompt
from .inspect import run as inspect_run


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the default model",
                       description="Load the default model, make a soft prompt, save it and show the file.")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--model", default=None, help="base model (hub id or local folder); default: SmolLM2-135M-Instruct")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    base = load_base_model(args.model)
    print(f"loaded {base.name} in {time.time() - t0:.1f}s (width {base.dim}, fingerprint {base.fingerprint[:12]})")
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    prompt = SoftPrompt.initialize(base.embedding, base.tokenizer, 20, "labels", labels=labels)
    pm = PromptedModel(base)
    tok = base.tokenizer
    enc = tok(["Text: Shares rose after the bank cut rates.\nTopic:"], return_tensors="pt")
    with torch.no_grad():
        logits = pm(enc["input_ids"], enc["attention_mask"], prompt())[:, -1]  # (1, V)
    first = [tok(" " + l, add_special_tokens=False)["input_ids"][0] for l in labels]
    probs = logits[0, first].softmax(-1)
    print("label-initialised prompt, untrained:", ", ".join(f"{l}={p:.2f}" for l, p in zip(labels, probs.tolist())))
    out = Path(args.out) / "topic.safetensors"
    meta = PromptMeta.for_base(base, prompt.length, task="classify", name="topic",
                               template="Text: {text}\nTopic:", labels=labels)
    save_prompt(out, prompt.weight, meta)
    load_prompt(out, base)  # round trip, checked against the base model
    print()
    return inspect_run(argparse.Namespace(file=str(out), json=False))
