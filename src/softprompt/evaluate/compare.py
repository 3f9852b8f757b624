"""Scoring a prompt file on labelled data, with baselines (:func:`evaluate_file`; what
``softprompt eval`` and ``softprompt demo`` run).

The label set, verbalizer and template come from the prompt file, so the prompt is scored the way
it was trained; baselines are scored on the same examples in the same run (see baselines.py).

Not here: the command line (commands/eval.py), the metrics (metrics.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from ..calibration import biases_of
from .. import progress
from ..artifact import PromptMeta, check_compatible, load_prompt
from .baselines import (PROMPT_ROW, BaselineConfig, BaselineContext, Comparison, format_table, method_title,
                         run_baselines)
from ..data import Example, TaskSpec, load_examples
from ..errors import DataError, check_at_least
from ..scoring_config import ScoringConfig
from .metrics import evaluate_prompt
from ..methods import METHODS
from ..precision import autocast, precision_name, resolve_precision
from ..sources import is_hub_ref
from ..tasks import task

TRAIN_FILE_KEYS = ("train_file", "train", "train_path", "data")
"""Keys of a prompt file's training summary that may name its training file."""


@dataclass
class EvalConfig(ScoringConfig):
    """Settings of ``softprompt eval``: the shared scoring settings (scoring_config.py), the data, and
    the baselines to compare with. Each field is also its flag (config_flags.py)."""

    data: str
    """Labelled data: .jsonl, .csv, .parquet, a folder saved by datasets (FOLDER[:SPLIT]) or
    hf:NAME[/CONFIG][:SPLIT]."""
    _: KW_ONLY
    target_field: str | None = None
    """Field of the label / output in the data (default: label / output)."""
    limit: int | None = None
    """Score a seeded, stratified subsample of N examples."""
    baselines: bool = False
    """Also score the baselines on the same examples."""
    train: str | None = None
    """Training file for few-shot and TF-IDF (default: the one the prompt was trained on)."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """The baselines' own settings (--shots, --seed, --instruction)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("--limit", self.limit, 1)


def training_file(meta: PromptMeta, prompt_path: str | Path) -> Path | str | None:
    """The training data a prompt's training summary names, if it still exists (relative paths
    are tried from the working directory and from the prompt file's folder; a ``hf:`` dataset id
    is returned as it is)."""
    for key in TRAIN_FILE_KEYS:
        value = (meta.training or {}).get(key)
        if not isinstance(value, str) or not value:
            continue
        if is_hub_ref(value):
            return value
        for cand in (Path(value), Path(prompt_path).parent / value):
            if cand.is_file() or cand.is_dir() or _saved_split(cand):
                return cand
    return None


def _saved_split(path: Path) -> bool:
    """True for ``FOLDER:SPLIT`` of a folder saved by datasets."""
    folder, sep, split = str(path).rpartition(":")
    return bool(sep and split) and Path(folder).is_dir()


def trained_spec(meta: PromptMeta, max_length: int | None = None) -> TaskSpec:
    """The task spec a prompt was trained with, its text and target lengths included (from the
    training summary, flat or under ``config``); ``max_length`` overrides, default 256."""
    summary = meta.training or {}
    settings = summary.get("config") if isinstance(summary.get("config"), dict) else {}

    def setting(key: str) -> int | None:
        v = summary.get(key, settings.get(key))
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 else None

    spec = TaskSpec.from_meta(meta, max_length=max_length or max(8, setting("max_length") or 256))
    spec.max_target_length = setting("max_target_length") or spec.max_target_length
    return spec


def check_labels(examples: list[Example], labels: list[str], where: str) -> None:
    """Refuse examples whose label is not one of the prompt's labels (names file:line)."""
    for ex in examples:
        if ex.target not in labels:
            raise DataError(f"{ex.locate(where)}: label {ex.target!r} is not one of the prompt's labels "
                            f"({', '.join(labels)})")


def evaluate_file(config: EvalConfig, base=None) -> Comparison:
    """Score a prompt file (and, with ``config.baselines``, the baselines) on ``config.data``.

    Args:
        base: an already loaded BaseModel; default: load ``config.model``.
    """
    from ..base import load_base_model
    from ..devices import resolve_device
    from ..examples import subsample
    from ..model import PromptedModel

    loaded = load_prompt(config.prompt)  # metadata first: cheap errors before loading a model
    meta = loaded.meta
    spec = trained_spec(meta, config.max_length)
    kind = task(spec.kind)
    examples = load_examples(config.data, spec.kind, config.source_field, config.target_field, default_split=None)
    if kind.labelled:
        check_labels(examples, spec.labels, config.data)
    if config.limit is not None:
        examples = subsample(examples, config.limit, spec.kind, config.baseline.seed)
    train_path = config.train or (str(training_file(meta, config.prompt) or "") or None)
    train = None
    if config.baselines and train_path:
        train = load_examples(train_path, spec.kind, config.source_field, config.target_field)
        if kind.labelled:
            check_labels(train, spec.labels, train_path)
    if base is None:
        base = load_base_model(config.model, device=resolve_device(config.device))
    check_compatible(meta, base, config.prompt, strict=not config.allow_other_base)
    pm = PromptedModel(base)
    gen_kw: dict = {}  # generation settings, for a kind that generates
    if kind.generates:
        gen_kw["max_new_tokens"] = config.max_new_tokens or spec.max_target_length
        if config.stop:
            gen_kw["stop"] = list(config.stop)
    amp = resolve_precision(config.precision, base.device)  # None: fp32
    with autocast(base.device, amp):
        t0 = time.perf_counter()
        with progress.stage("soft prompt"):
            prompt_m = evaluate_prompt(pm, loaded.tensor.to(base.device), spec, examples, config.batch_size,
                                       biases=biases_of(meta), **gen_kw)
        prompt_m["seconds"] = round(time.perf_counter() - t0, 2)
        note = METHODS[meta.method].report_note  # e.g. "at every layer (deep prompt)"
        prompt_m["setup"] = f"{meta.length} virtual tokens{' ' + note if note else ''}, template {spec.template!r}"
        if meta.calibration is not None:
            prompt_m["setup"] += ", calibrated label scores"
        results = {PROMPT_ROW: prompt_m}
        skipped: dict[str, str] = {}
        if config.baselines:
            ctx = BaselineContext(pm, spec, examples, train, config.baseline, meta.name, config.batch_size, gen_kw)
            more, skipped = run_baselines(ctx)
            results.update(more)
    return Comparison(config.prompt, config.data, meta, spec, len(examples), results, skipped,
                      train_path if train is not None else None, [ex.target for ex in examples],
                      precision_name(amp))


# ----------------------------------------------------------------------------- output

def format_details(m: dict) -> str:
    """Per-class precision/recall/F1 and the confusion matrix (rows = gold) of one method."""
    labels = m["confusion"]["labels"]
    w = max(8, *(len(l) for l in labels))
    lines = [f"{'class':<{w}}  precision  recall     f1  support"]
    for l in labels:
        c = m["per_class"][l]
        lines.append(f"{l:<{w}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}")
    cw = max(5, *(len(l) for l in labels))
    lines += ["", "confusion (rows = gold, columns = predicted)",
              f"{'':<{w}}  " + "  ".join(f"{l[:cw]:>{cw}}" for l in labels)]
    for l, row in zip(labels, m["confusion"]["matrix"]):
        lines.append(f"{l:<{w}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def print_result(result: Comparison, out=None) -> None:
    """The human summary: what was scored, the table, and the prompt's per-class details."""
    out = out or sys.stdout
    extra = f", training file {result.train_path}" if result.train_path else ""
    print(f"{result.prompt_path} on {result.data_path}: {result.n} examples, task {result.spec.kind}, "
          f"max length {result.spec.max_length}, {result.precision}{extra}", file=out)
    print(file=out)
    print(format_table(result), file=out)
    print(file=out)
    for name, m in result.results.items():
        print(f"  {method_title(name)}: {m.get('setup', '')}", file=out)
    if task(result.spec.kind).labelled:
        print(f"\nsoft prompt per class\n{format_details(result.results[PROMPT_ROW])}", file=out)
