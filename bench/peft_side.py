"""The PEFT side of the benchmarks, written the way a PEFT user writes it.

``get_peft_model`` with ``PromptTuningConfig`` (TEXT init, as in PEFT's prompt-tuning guide) or
``LoraConfig`` (r=8 on q_proj/v_proj), a plain loop calling the model with ``labels`` (its own loss:
full logits at every position, labels -100 except the targets), batches padded by the tokenizer to
the longest row, AdamW with PEFT's guide learning rate (3e-2 for prompt tuning) and a linear decay.

Both sides see the same token ids: the source is cut by the same :class:`TaskSpec` (``max_length``)
and the targets are the same label / headline tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from softprompt.base import resolve_model
from softprompt.data import Example, TaskSpec
from softprompt.model import IGNORE_INDEX
from softprompt.precision import autocast, precision_name, resolve_precision


def init_text(spec: TaskSpec, what: str) -> str:
    """The TEXT-init task description (PEFT's guide: "Classify if the tweet is a complaint or not:")."""
    if spec.kind == "classify":
        return f"Classify the {what} of this text as one of {', '.join(spec.words)}:"
    return f"Write the {what} of this text:"


def load_hf(model: str | None = None):
    """The same weights softprompt's default loads, as a plain float32 HF model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model(model)[1]
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok, path


def encode(spec: TaskSpec, tok, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: source + target tokens, labels -100 on the source."""
    src = spec.source_ids(tok, ex.source)
    if spec.kind == "classify":
        tgt = spec.label_ids(tok)[spec.labels.index(ex.target)]
    else:
        tgt = spec.target_ids(tok, ex.target)
    return src + tgt, [IGNORE_INDEX] * len(src) + tgt


def collate(tok, rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """The tokenizer pads input ids to the longest row; labels padded with -100 on the same side."""
    batch = tok.pad({"input_ids": [r[0] for r in rows]}, return_tensors="pt")
    T = batch["input_ids"].shape[1]
    left = tok.padding_side == "left"
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (_, lab) in enumerate(rows):
        if left:
            labels[i, T - len(lab):] = torch.tensor(lab)
        else:
            labels[i, : len(lab)] = torch.tensor(lab)
    batch["labels"] = labels
    return batch


def peft_prompt_tuning(lm, model_path: str, text: str, num_virtual_tokens: int = 20):
    """``get_peft_model`` with prompt tuning, TEXT init from the task description ``text``."""
    from peft import PromptTuningConfig, get_peft_model

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                             prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                             tokenizer_name_or_path=model_path)
    return get_peft_model(lm, cfg)


def peft_lora(lm, r: int = 8):
    """``get_peft_model`` with LoRA r=8 on q_proj/v_proj (alpha 16, dropout 0.05, PEFT's guides)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.05,
                     target_modules=["q_proj", "v_proj"])
    return get_peft_model(lm, cfg)


def peft_prefix(lm, num_virtual_tokens: int = 20):
    """``get_peft_model`` with prefix tuning: ``num_virtual_tokens`` keys/values per layer, PEFT's
    defaults otherwise (no projection MLP, so a random ``nn.Embedding`` init: PEFT has no text init
    for prefixes)."""
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(lm, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))


LEARNING_RATES = {"prompt-tuning": 3e-2, "prefix-tuning": 1e-2, "lora": 1e-3}
"""PEFT's guides: 3e-2 for prompt tuning; 1e-2 for prefix tuning; 1e-3 in its LoRA causal-LM examples."""


@dataclass
class PeftRun:
    """What one PEFT training run did."""

    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # padded tokens per batch (B x T)
    precision: str = "fp32"
    """What the forward ran in: fp32, or bfloat16 autocast."""

    def examples_per_second(self, batch_size: int, skip: int = 1) -> float:
        s = self.step_seconds[skip:] or self.step_seconds
        return batch_size * len(s) / sum(s)


def train_peft(model, tok, spec: TaskSpec, examples: Sequence[Example], steps: int, batch_size: int = 8,
               lr: float = 3e-2, seed: int = 0, log_every: int = 0, on_step=None,
               precision: str = "fp32") -> PeftRun:
    """A plain PEFT training loop: shuffle, pad, ``model(**batch).loss``, AdamW, linear decay.
    ``on_step(step, run)``, if given, is called after each step outside the timed part (learning curves).
    ``precision``: softprompt's ``--precision`` rule (``auto``: bf16 autocast where the CPU has native
    bf16, fp32 elsewhere), so that PEFT can run in the fastest precision the machine has (issue #26)."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = [encode(spec, tok, ex) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    model.train()
    order: list[int] = []
    device = next(model.parameters()).device
    amp = resolve_precision(precision, device)
    run = PeftRun(precision=precision_name(amp))
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate(tok, [encoded[i] for i in idx])
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        run.step_seconds.append(time.perf_counter() - t0)
        run.losses.append(float(loss.detach()))
        run.tokens.append(int(batch["input_ids"].numel()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  peft step {step + 1}/{steps} loss {run.losses[-1]:.3f} ({run.step_seconds[-1]:.2f} s)", flush=True)
        if on_step is not None:
            model.eval()
            on_step(step + 1, run)
            model.train()
    model.eval()
    return run


def prompt_of(model) -> torch.Tensor:
    """The trained (P, d) virtual-token embeddings of a PEFT prompt-tuning model."""
    return model.get_prompt_embedding_to_save(adapter_name="default").detach().float()


@torch.no_grad()
def peft_label_logprobs(model, tok, spec: TaskSpec, text: str) -> torch.Tensor:
    """Summed log p(label tokens | source) of each label through the PEFT model's own forward
    (one unpadded row per label), (C,). A check that scoring a PEFT prompt with softprompt's
    scorer measures the same thing PEFT computes."""
    src = spec.source_ids(tok, text)
    out = []
    for lab in spec.label_ids(tok):
        ids = torch.tensor([src + lab])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()  # (P + T, V)
        lp = logits[-len(lab) - 1 : -1].log_softmax(-1)  # (L, V): the positions predicting the label
        out.append(float(lp.gather(1, torch.tensor(lab)[:, None]).sum()))
    return torch.tensor(out)


@torch.no_grad()
def peft_classify_scores(model, tok, spec: TaskSpec, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Rank classification through the PEFT model's own forward: summed log p(label tokens | source)
    of every (text, label) pair, (N, C). For adapters whose trained state is not a (P, d) input
    prompt softprompt's scorer could take (prefix tuning's per-layer keys/values): the same
    quantity ``softprompt.evaluate`` computes, one right-padded row per pair."""
    labels = spec.label_ids(tok)
    srcs = [spec.source_ids(tok, t) for t in texts]
    pairs = [(i, c) for i in range(len(texts)) for c in range(len(labels))]
    out = torch.empty(len(texts), len(labels))
    pad = tok.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [srcs[i] + labels[c] for i, c in chunk]
        T = max(len(q) for q in seqs)
        ids = torch.tensor([q + [pad] * (T - len(q)) for q in seqs])  # (b, T) right-padded
        mask = torch.tensor([[1] * len(q) + [0] * (T - len(q)) for q in seqs])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (b, V? + T, V)
        logp = logits[:, logits.shape[1] - T :].log_softmax(-1)  # (b, T, V): prompt tuning also returns virtual rows
        for k, (i, c) in enumerate(chunk):
            s, lab = len(srcs[i]), torch.tensor(labels[c])
            out[i, c] = logp[k, s - 1 : s - 1 + len(lab)].gather(1, lab[:, None]).sum()  # positions predicting the label
    return out
