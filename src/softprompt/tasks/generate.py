"""The generation kind (``--task generate``): free text after the source, scored by ROUGE-L.

Targets are EOS-terminated token sequences; training minimises their mean negative log-likelihood
(lm head at target positions only); evaluation generates and reports exact match, ROUGE-L and
chrF; ``predict`` answers the generated text and why it stopped.

Not here: how generation steps and stops (scoring.generate_after, textgen.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import progress
from ..errors import DataError
from ..model import IGNORE_INDEX, PromptedModel
from ..prefix import prefix_forward, read_after, source_state
from ..scoring import generate_after, pad_id, right_pad
from .shared import cut_tokens, length_batches, prompts_for, row_prompts
from .task import Example, Serving, Spec, Task


def check_spec(spec: Spec) -> None:
    """No labels, no verbalizer: generation has no label set."""
    if spec.labels or spec.verbalizer:
        raise DataError("labels and a verbalizer only apply to --task classify")


def loss(pm: PromptedModel, prompts, rows, label_ids, share_prefix: bool, classify_loss: str = "ce"):
    """Mean NLL of each generation row's target tokens, all rows in one teacher-forced pass.
    Returns (losses (n,) float32, the index into ``rows`` of each)."""
    dev = pm.base.device
    tasks = [r.task for r in rows]
    seqs = [r.source + list(r.target) for r in rows]
    ids, mask = right_pad(seqs, pad_id(pm), dev)  # (b, T)
    labels = torch.full_like(ids, IGNORE_INDEX)  # (b, T): loss only on target tokens
    for k, r in enumerate(rows):
        s, t = len(r.source), len(r.target)
        labels[k, s : s + t] = ids[k, s : s + t]
    if share_prefix:
        hidden, _, _ = read_after(pm, prefix_forward(pm, prompts, tasks), ids, mask)  # (b, T, d)
        sums, counts = pm.score_targets(hidden, labels)  # (b,), (b,)
    else:
        sums, counts = pm.target_logprobs(ids, mask, prompts_for(prompts, tasks), labels)
    return -(sums.float() / counts.clamp(min=1)), list(range(len(rows)))  # (b,) mean NLL per row


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def generate_texts(
    pm: PromptedModel,
    prompt: torch.Tensor | None,
    spec: Spec,
    texts: Sequence[str],
    batch_size: int = 16,
    **gen_kw,
) -> list[str]:
    """Generated continuation of each text (``gen_kw`` as :func:`softprompt.scoring.generate`)."""
    tok = pm.base.tokenizer
    sources = [spec.source_ids(tok, t) for t in texts]
    out: list[str] = [""] * len(texts)
    p = row_prompts(prompt, pm.base.dim, pm.base.device, pm.lm.dtype)
    with progress.bar(len(texts), leave=False) as shown:
        for idx in length_batches([len(s) for s in sources], batch_size):
            for i, g in zip(idx, generate_after(pm, source_state(pm, p, [sources[i] for i in idx]), **gen_kw)):
                out[i] = g.text
            shown.update(len(idx))
    return out


def generation_metrics(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Exact match, ROUGE-L F1 (rouge-score) and chrF (sacrebleu), all in [0, 1]."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    em = [r.strip().lower() == h.strip().lower() for r, h in zip(refs, hyps)]
    chrf = CHRF().corpus_score(list(hyps), [list(refs)]).score / 100
    n = max(1, len(refs))
    return {"exact_match": sum(em) / n, "rouge_l": sum(rouge) / n, "chrf": float(chrf), "n": len(refs)}


def evaluate(pm: PromptedModel, prompt: torch.Tensor | None, spec: Spec, examples: Sequence[Example],
             batch_size: int = 16, biases: torch.Tensor | None = None, **gen_kw) -> dict:
    """Generation metrics and ``predictions``; ``max_new_tokens`` defaults to the spec's target length."""
    texts = [e.source for e in examples]
    gold = [e.target for e in examples]
    gen_kw.setdefault("max_new_tokens", spec.max_target_length)
    hyps = generate_texts(pm, prompt, spec, texts, batch_size, **gen_kw)
    m = generation_metrics(gold, hyps)
    m["predictions"] = hyps
    return m


# ----------------------------------------------------------------------------- baselines, predict


def _instruction(spec: Spec, name: str | None) -> str:
    return f"Write the {name} for the input." if name else "Read the input and write the output."


def _shot_target(spec: Spec, ex: Example, tokenizer, budget: int) -> str:
    return cut_tokens(tokenizer, ex.target, max(1, budget // 2))


def _shot_frame(spec: Spec, tokenizer, min_text: int) -> int:
    return len(tokenizer(spec.render(""), add_special_tokens=False)["input_ids"]) + min_text


def predict(predictor, texts: list[str]) -> list[dict]:
    """``{"output", "finish_reason"}`` per text, sampled as ``--temperature`` / ``--top-p`` / ``--seed`` say."""
    c, spec, pm = predictor.config, predictor.spec, predictor.pm
    sources = [spec.source_ids(pm.base.tokenizer, t) for t in texts]
    gens = generate_after(pm, source_state(pm, predictor.prompt, sources),
                          max_new_tokens=c.max_new_tokens or spec.max_target_length,
                          temperature=c.temperature, top_p=c.top_p, stop=c.stop,
                          seed=None if c.seed is None else c.seed + predictor.done)
    return [{"output": g.text, "finish_reason": g.finish_reason} for g in gens]


GENERATE = Task(
    name="generate",
    about="text generation after the input (exact match, ROUGE-L, chrF)",
    placeholder="input",
    template="Input: {input}\nOutput:",
    fields=("input", "output"),
    field_flags=("--input-field", "--output-field"),
    labelled=False,
    check_spec=check_spec,
    label_ids=lambda spec, tok: None,
    encode_target=lambda spec, tok, target: spec.target_ids(tok, target),
    loss=loss,
    init=lambda has_text: "text" if has_text else "vocab",
    generates=True,
    evaluate=evaluate,
    primary_metric="rouge_l",
    columns=(("exact_match", "exact"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")),
    report_columns=(("exact_match", "exact match"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")),
    baselines=("bare", "instruction", "instruction-chat", "few-shot"),
    instruction=_instruction,
    shot_target=_shot_target,
    shot_frame=_shot_frame,
    predict=predict,
    serving=Serving(start=lambda steps: steps.admit, running=lambda steps: steps.generating_jobs,
                    advance=lambda steps: steps.step, decodes=True),  # joins the running generation batch
)
