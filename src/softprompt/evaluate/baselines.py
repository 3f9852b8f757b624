"""Baselines a tuned prompt is compared with, on the same examples and through the same scoring.

- ``bare``: the base model with no prompt and the same template.
- ``instruction``: a hand-written instruction (what a prompt engineer would write first) before
  the template.
- ``instruction-chat``: the same instruction and template as the user's turn of the model's chat
  template, the answer scored as the assistant's reply (chat models; skipped without a template).
- ``few-shot``: k training examples in context (seeded, balanced over classes), each cut short so
  together they take at most half of ``max_length`` (fewer examples when k do not fit).
- ``tfidf-lr``: TF-IDF + logistic regression trained on the training file (classification).

The language-model baselines are :class:`~softprompt.data.TaskSpec` s with a longer template,
scored by :func:`softprompt.evaluate.evaluate_prompt` with ``prompt=None``: exactly the path the
tuned prompt takes, minus the prompt.

Not here: loading files (compare.py), plots (report.py).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .. import progress
from ..artifact import PromptMeta
from ..data import Example, TaskSpec
from ..errors import ConfigError
from ..model import PromptedModel
from ..tasks import TASKS, task
from ..tasks.classify import classification_metrics
from ..tasks.shared import cut_tokens
from .metrics import evaluate_prompt

SHOT_SEPARATOR = "\n\n"
"""Between in-context examples (and the stop string of few-shot generation)."""

SHOT_SHARE = 0.5
"""Share of ``max_length`` the few-shot examples may take together; the rest is the query's."""

MIN_SHOT_TEXT = 8
"""Fewest text tokens an in-context example keeps; fewer shots are used when k do not fit."""


@dataclass
class BaselineConfig:
    """Settings of the baselines (also ``softprompt eval``'s flags, config_flags.py)."""

    shots: int = 5
    """In-context examples of the few-shot baseline."""
    seed: int = 0
    """Seeds the shots, the classifier and --limit."""
    instruction: str | None = None
    """Text of the instruction baselines (default: built from the task name and labels)."""

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ConfigError(f"--shots must be at least 1, got {self.shots}")
        if self.instruction is not None and not self.instruction.strip():
            raise ConfigError("--instruction must not be empty")


@dataclass
class BaselineContext:
    """What a baseline gets: the model, the task, the eval examples and the training examples."""

    pm: PromptedModel
    spec: TaskSpec
    examples: Sequence[Example]
    train: Sequence[Example] | None = None
    config: BaselineConfig = field(default_factory=BaselineConfig)
    name: str | None = None
    """The task's name from the prompt file (e.g. "topic"), used in the default instruction."""
    batch_size: int = 16
    gen_kw: dict = field(default_factory=dict)
    """Generation settings (``max_new_tokens``, ``stop``...) shared by every method."""


# ----------------------------------------------------------------------------- text baselines (pure)


def default_instruction(spec: TaskSpec, name: str | None = None) -> str:
    """What a prompt engineer would write first, e.g. "Classify the topic of the text as one of:
    business, sport, tech." (the words listed are the ones scored)."""
    return task(spec.kind).instruction(spec, name)


def _safe(text: str, spec: TaskSpec) -> str:
    """Keep literal placeholders in example text from being mistaken for the template's."""
    ph = spec.placeholder
    return text.replace("{" + ph + "}", "(" + ph + ")")


def instruction_spec(spec: TaskSpec, instruction: str) -> TaskSpec:
    """``spec`` with ``instruction`` and a blank line before its template."""
    return replace(spec, template=_safe(instruction.strip(), spec) + SHOT_SEPARATOR + spec.template)


def chat_spec(spec: TaskSpec, instruction: str, tokenizer) -> TaskSpec:
    """``spec`` as one chat turn: ``instruction``, a blank line and the template are the user's
    message in the tokenizer's chat template; the label words / output are the assistant's reply."""
    question = instruction_spec(spec, instruction).template.rstrip()
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    bos, adds_bos = tokenizer.bos_token, tokenizer("", add_special_tokens=True)["input_ids"][:1]
    if bos and text.startswith(bos) and adds_bos == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # the tokenizer puts it back when the source is encoded
    return replace(spec, template=text)


def pick_shots(train: Sequence[Example], k: int, kind: str, seed: int = 0) -> list[Example]:
    """k training examples (seeded); for a labelled kind (classification) round-robin over the
    classes so they are balanced where possible, then shuffled so no class always sits last."""
    rng = random.Random(seed)
    if not task(kind).labelled:
        return rng.sample(list(train), min(k, len(train)))
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in train:
        groups[ex.target].append(ex)
    pools = [rng.sample(v, len(v)) for _, v in sorted(groups.items())]
    rng.shuffle(pools)
    out: list[Example] = []
    while len(out) < k and any(pools):
        for pool in pools:
            if pool and len(out) < k:
                out.append(pool.pop())
    rng.shuffle(out)
    return out


def render_shot(spec: TaskSpec, ex: Example, tokenizer, budget: int) -> str:
    """One in-context example (template with its source, then its target), at most about
    ``budget`` tokens: the target (cut to half the budget for generation) is kept whole and the
    source is cut to what is left (at least 4 tokens)."""
    target = task(spec.kind).shot_target(spec, ex, tokenizer, budget)
    tail = spec._lead() + _safe(target, spec)
    frame = len(tokenizer(spec.render("") + tail, add_special_tokens=False)["input_ids"])
    source = cut_tokens(tokenizer, _safe(ex.source, spec), max(4, budget - frame))
    return spec.render(source) + tail


def shots_that_fit(spec: TaskSpec, tokenizer, k: int) -> int:
    """How many of ``k`` in-context examples fit in ``SHOT_SHARE`` of ``spec.max_length`` with at
    least ``MIN_SHOT_TEXT`` text tokens each (at least 1), so the query keeps its share."""
    frame = task(spec.kind).shot_frame(spec, tokenizer, MIN_SHOT_TEXT)
    per_shot = frame + MIN_SHOT_TEXT + len(tokenizer(SHOT_SEPARATOR, add_special_tokens=False)["input_ids"])
    return max(1, min(k, int(spec.max_length * SHOT_SHARE) // per_shot))


def few_shot_spec(spec: TaskSpec, shots: Sequence[Example], tokenizer) -> TaskSpec:
    """``spec`` with in-context examples before its template, together within ``SHOT_SHARE`` of
    ``spec.max_length`` tokens (the query text is cut to the rest by ``TaskSpec.source_ids``)."""
    if not shots:
        raise ConfigError("few-shot needs at least one training example")
    budget = max(8, int(spec.max_length * SHOT_SHARE) // len(shots))
    blocks = [render_shot(spec, ex, tokenizer, budget) for ex in shots]
    return replace(spec, template=SHOT_SEPARATOR.join(blocks) + SHOT_SEPARATOR + spec.template)


# ----------------------------------------------------------------------------- the baselines


def run_bare(ctx: BaselineContext) -> dict:
    """The base model, no prompt, same template."""
    m = evaluate_prompt(ctx.pm, None, ctx.spec, ctx.examples, ctx.batch_size, **ctx.gen_kw)
    m["setup"] = f"template {ctx.spec.template!r}, no prompt"
    return m


def _run_instruction(ctx: BaselineContext, chat: bool) -> dict:
    text = ctx.config.instruction or default_instruction(ctx.spec, ctx.name)
    spec = chat_spec(ctx.spec, text, ctx.pm.base.tokenizer) if chat else instruction_spec(ctx.spec, text)
    m = evaluate_prompt(ctx.pm, None, spec, ctx.examples, ctx.batch_size, **ctx.gen_kw)
    m["setup"] = f"instruction {text!r}" + (" in the chat template" if chat else "")
    return m


def run_instruction(ctx: BaselineContext) -> dict:
    """A hand-written instruction before the template."""
    return _run_instruction(ctx, chat=False)


def run_instruction_chat(ctx: BaselineContext) -> dict:
    """The instruction and the template as a chat turn, the answer as the assistant's reply."""
    return _run_instruction(ctx, chat=True)


def run_few_shot(ctx: BaselineContext) -> dict:
    """k training examples in context before the template (fewer when k do not fit)."""
    k = shots_that_fit(ctx.spec, ctx.pm.base.tokenizer, ctx.config.shots)
    shots = pick_shots(ctx.train or [], k, ctx.spec.kind, ctx.config.seed)
    spec = few_shot_spec(ctx.spec, shots, ctx.pm.base.tokenizer)
    gen_kw = dict(ctx.gen_kw)
    if task(ctx.spec.kind).generates:  # the model would go on writing the next example
        gen_kw["stop"] = [*gen_kw.get("stop", ()), SHOT_SEPARATOR]
    m = evaluate_prompt(ctx.pm, None, spec, ctx.examples, ctx.batch_size, **gen_kw)
    n_ctx = len(ctx.pm.base.tokenizer(spec.render(""), add_special_tokens=False)["input_ids"])
    fit = "" if k == ctx.config.shots else f" (of {ctx.config.shots}: no more fit in half of {ctx.spec.max_length} tokens)"
    m["setup"] = f"{len(shots)} shots{fit}, seed {ctx.config.seed}, {n_ctx} context tokens before the query"
    return m


def tfidf_lr(train: Sequence[Example], examples: Sequence[Example], labels: Sequence[str], seed: int = 0) -> dict:
    """Train TF-IDF (word 1-2 grams, sublinear tf) + logistic regression on ``train`` and score
    ``examples`` (whole texts); classification metrics plus ``log_loss`` and ``predictions``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len({ex.target for ex in train}) < 2:
        raise ConfigError("tfidf-lr needs at least 2 classes in the training file")
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                        LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit([ex.source for ex in train], [ex.target for ex in train])
    texts, gold = [ex.source for ex in examples], [ex.target for ex in examples]
    pred = [str(p) for p in clf.predict(texts)]
    m = classification_metrics(gold, pred, labels)
    probs = clf.predict_proba(texts)  # (N, classes seen in training)
    col = {c: i for i, c in enumerate(clf.classes_)}
    m["log_loss"] = float(sum(-math.log(max(probs[i][col[g]] if g in col else 0.0, 1e-15))
                              for i, g in enumerate(gold)) / max(1, len(gold)))
    m["predictions"] = pred
    return m


def run_tfidf_lr(ctx: BaselineContext) -> dict:
    """A classical text classifier trained on the training file."""
    m = tfidf_lr(ctx.train or [], ctx.examples, ctx.spec.labels, ctx.config.seed)
    m["setup"] = f"trained on {len(ctx.train or [])} examples, whole texts"
    return m


def needs_train(ctx: BaselineContext) -> str | None:
    return None if ctx.train else "no training data (pass --train FILE)"


def needs_chat_template(ctx: BaselineContext) -> str | None:
    return None if getattr(ctx.pm.base.tokenizer, "chat_template", None) else "the tokenizer has no chat template"


@dataclass(frozen=True)
class Baseline:
    """A baseline: how to run it and why it cannot run (None: it can). Which task kinds it applies
    to is the kind's to say (``Task.baselines``)."""

    run: Callable[[BaselineContext], dict]
    title: str
    unavailable: Callable[[BaselineContext], str | None] = lambda ctx: None


BASELINES: dict[str, Baseline] = {
    "bare": Baseline(run_bare, "bare model"),
    "instruction": Baseline(run_instruction, "instruction"),
    "instruction-chat": Baseline(run_instruction_chat, "instruction, chat", unavailable=needs_chat_template),
    "few-shot": Baseline(run_few_shot, "few-shot", unavailable=needs_train),
    "tfidf-lr": Baseline(run_tfidf_lr, "TF-IDF + LR", unavailable=needs_train),
}
"""Baselines by name, in table order."""


def run_baselines(ctx: BaselineContext, names: Sequence[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """Run the baselines that apply to the task.

    Returns:
        (metrics by baseline name, each with ``predictions``, ``setup`` and ``seconds``;
         reason by name of each baseline skipped).
    """
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in names or list(BASELINES):
        if name not in BASELINES:
            raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        b = BASELINES[name]
        if name not in task(ctx.spec.kind).baselines:
            continue
        why = b.unavailable(ctx)
        if why:
            skipped[name] = why
            continue
        t0 = time.perf_counter()
        with progress.stage(f"baseline {b.title}"):
            results[name] = b.run(ctx)
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return results, skipped


# ----------------------------------------------------------------------------- the comparison

PROMPT_ROW = "prompt"
"""Key of the tuned prompt's results (the baselines use their BASELINES names)."""


@dataclass
class Comparison:
    """Metrics of the prompt and each baseline on the same examples."""

    prompt_path: str
    data_path: str
    meta: PromptMeta
    spec: TaskSpec
    n: int
    results: dict[str, dict]
    """Method name -> metrics (``PROMPT_ROW`` first, then baselines), with ``predictions``."""
    skipped: dict[str, str] = field(default_factory=dict)
    train_path: str | None = None
    gold: list[str] = field(default_factory=list)
    precision: str = "fp32"
    """Compute precision of the language-model scoring ("fp32", "bfloat16", "float16")."""

    def to_json(self) -> dict:
        """Everything but the per-example predictions."""
        return {
            "prompt": self.prompt_path, "data": self.data_path, "train": self.train_path, "n": self.n,
            "task": self.spec.kind, "template": self.spec.template, "labels": self.spec.labels,
            "max_length": self.spec.max_length, "precision": self.precision,
            "results": {k: {m: v for m, v in r.items() if m != "predictions"} for k, r in self.results.items()},
            "skipped": self.skipped,
        }


COLUMNS: dict[str, list[tuple[str, str]]] = {k: list(t.columns) for k, t in TASKS.items()}
"""Table columns of each task kind: (metric key, header)."""


def method_title(name: str) -> str:
    return "soft prompt" if name == PROMPT_ROW else BASELINES[name].title


def format_table(result: Comparison) -> str:
    """The methods side by side, one row each (plain text)."""
    cols = COLUMNS[result.spec.kind]
    head = ["method"] + [h for _, h in cols] + ["seconds"]
    rows = []
    for name, m in result.results.items():
        vals = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else "-" for k, _ in cols]
        rows.append([method_title(name)] + vals + [f"{m.get('seconds', 0):.1f}"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += [f"({method_title(k)} skipped: {why})" for k, why in result.skipped.items()]
    return "\n".join(lines)


