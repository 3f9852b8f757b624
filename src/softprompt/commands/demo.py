"""``softprompt demo``: the README's first command, end to end on real data.

Writes the BBC News topic data, trains a topic prompt on the default model, scores it against the
baselines (bare model, instruction, the instruction in the chat template, few-shot, TF-IDF +
logistic regression) on test articles, writes the HTML report and shows the prompt file. The
defaults are sized for a few minutes on two CPU cores; every size is a flag.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from .. import progress
from ..cli_help import add_device
from ..artifact import atomic_write_bytes
from ..errors import ConfigError, check_choice
from ..precision import PRECISIONS

TEMPLATE = "Text: {text}\nTopic:"
NAME = "topic"


@dataclass
class DemoConfig:
    """Settings of ``softprompt demo``.

    Args:
        out: output folder (data, prompt file, run log, report).
        model: base model; None: the default model.
        steps: optimizer steps (``--steps``).
        batch_size: examples per step.
        max_length: most tokens of template + text, for training and scoring alike.
        prompt_length: virtual tokens.
        dev_size: dev articles for the training-time evaluations (best prompt, curves).
        test_size: test articles the prompt and the baselines are scored on.
        shots: in-context examples of the few-shot baseline.
        seed: seeds the data split, the subsets, the prompt init and the data order.
        threads: torch (and scikit-learn) CPU threads; None: the libraries' default, one per core.
            Default 1: on a shared 2-core machine two threads ran 10x slower than one (OpenMP
            threads spin waiting for a core).
        precision: ``--precision`` of training and scoring: auto (bf16 on CPUs with native bf16
            instructions, else fp32; see precision.py), fp32, bf16, fp16 (CUDA).
    """

    out: str = "demo-out"
    model: str | None = None
    steps: int = 40
    batch_size: int = 8
    max_length: int = 64
    prompt_length: int = 20
    dev_size: int = 50
    test_size: int = 100
    shots: int = 5
    seed: int = 0
    threads: int | None = 1
    precision: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("--precision", self.precision, PRECISIONS)
        for flag, value, least in [("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1),
                                   ("--max-length", self.max_length, 16), ("--prompt-length", self.prompt_length, 1),
                                   ("--dev-size", self.dev_size, 5), ("--test-size", self.test_size, 5),
                                   ("--shots", self.shots, 1), ("--threads", 1 if self.threads is None else self.threads, 1)]:
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")


def register(sub) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="train a topic prompt on BBC News and compare it with baselines",
                       description="End to end on real data: write the BBC News topic data, train a soft prompt "
                                   "on the default model, score it against the bare model, an instruction, "
                                   "few-shot examples and TF-IDF + logistic regression, write an HTML report.")
    p.add_argument("--out", default=d.out, help=f"output folder (default: {d.out})")
    p.add_argument("--model", default=None, help="base model (hub id or folder); default: SmolLM2-135M-Instruct")
    p.add_argument("--max-steps", dest="steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--steps", dest="steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default: {d.batch_size})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens of template + text, training and scoring (default: {d.max_length})")
    p.add_argument("--prompt-length", type=int, default=d.prompt_length, help=f"virtual tokens (default: {d.prompt_length})")
    p.add_argument("--dev-size", type=int, default=d.dev_size, help=f"dev articles (default: {d.dev_size})")
    p.add_argument("--test-size", type=int, default=d.test_size, help=f"test articles scored (default: {d.test_size})")
    p.add_argument("--shots", type=int, default=d.shots, help=f"few-shot examples (default: {d.shots})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads (default: 1, robust on a busy machine; 0: one per core)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="auto (default: bf16 where the CPU runs it natively, else fp32), fp32, bf16, fp16 (CUDA)")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run_demo(config: DemoConfig) -> dict:
    """Run the demo; returns the paths written, the comparison and the timings."""
    import torch

    if config.threads:
        from threadpoolctl import threadpool_limits  # scikit-learn's BLAS/OpenMP pools too

        torch.set_num_threads(config.threads)
        with threadpool_limits(config.threads):
            return _run(config)
    return _run(config)


def _run(config: DemoConfig) -> dict:
    import torch

    from ..base import load_base_model
    from ..devices import resolve_device
    from ..evaluate.baselines import BaselineConfig
    from ..data import load_examples
    from ..examples import jsonl_bytes, subsample, write_example_data
    from ..precision import precision_name, resolve_precision
    from ..evaluate.report import write_report
    from ..train import TrainConfig, train
    from ..evaluate.compare import EvalConfig, evaluate_file, print_result
    from .inspect import run as inspect_run

    t0 = time.perf_counter()
    out = Path(config.out)
    data = out / "data"
    written = write_example_data("bbc-news", data, seed=config.seed)
    dev = subsample(load_examples(written["dev"][0], "classify"), config.dev_size, "classify", config.seed)
    dev_path = data / f"dev-{len(dev)}.jsonl"
    atomic_write_bytes(dev_path, jsonl_bytes(dev, "classify"))
    sizes = " / ".join(f"{n:,} {s}" for s, (_, n) in written.items())
    print(f"[1/4] BBC News topics: {sizes} articles in {data}/ (5 topics)")

    base = load_base_model(config.model, device=resolve_device(config.device))
    amp = precision_name(resolve_precision(config.precision, base.device))
    print(f"      base model {base.name} (width {base.dim}), {torch.get_num_threads()} CPU thread(s), "
          f"precision {amp}{' (this CPU runs bf16 natively)' if config.precision == 'auto' and amp != 'fp32' else ''}")
    print(f"[2/4] training a {config.prompt_length}-token prompt: {config.steps} steps x {config.batch_size} "
          f"articles cut to {config.max_length} tokens, best of {len(dev)} dev articles kept")
    t1 = time.perf_counter()
    result = train(TrainConfig(
        data=str(written["train"][0]), eval=str(dev_path), out=str(out / f"{NAME}.safetensors"), name=NAME,
        template=TEMPLATE, max_steps=config.steps, batch_size=config.batch_size, max_length=config.max_length,
        prompt_length=config.prompt_length, seed=config.seed, eval_batch_size=16, patience=None,
        precision=config.precision, quiet=not progress.enabled()), base=base)
    train_s = time.perf_counter() - t1

    print(f"\n[3/4] the prompt vs baselines on {config.test_size} test articles (same examples, same scoring)\n")
    t2 = time.perf_counter()
    comparison = evaluate_file(EvalConfig(
        prompt=str(result.path), data=str(written["test"][0]), baselines=True, train=str(written["train"][0]),
        baseline=BaselineConfig(shots=config.shots, seed=config.seed), max_length=config.max_length,
        limit=config.test_size, precision=config.precision), base=base)
    eval_s = time.perf_counter() - t2
    print_result(comparison)
    print(f"\n{verdict(comparison)}")

    report = write_report(out / "report.html", comparison)
    size = result.path.stat().st_size
    print(f"\n[4/4] the prompt file: {size:,} bytes ({config.prompt_length} x {base.dim} float16 = "
          f"{config.prompt_length * base.dim * 2:,} bytes of weights, the rest metadata)\n")
    inspect_run(argparse.Namespace(file=str(result.path), json=False))
    total = time.perf_counter() - t0
    print(f"\nreport: {report[0]} (plots: {', '.join(p.name for p in report[1:])})")
    print(f"time: {total:.0f} s in all (training {train_s:.0f} s, scoring {len(comparison.results)} methods {eval_s:.0f} s)")
    print(f"next: softprompt predict {result.path} \"Shares rose after the central bank cut rates.\"")
    return {"prompt": result.path, "report": report[0], "comparison": comparison, "train": result,
            "seconds": {"total": total, "train": train_s, "eval": eval_s}}


def verdict(comparison) -> str:
    """One line: the soft prompt's accuracy and macro-F1 next to the best baseline's (by macro-F1,
    which a prompt that ignores a rare class cannot win by accuracy alone)."""
    from ..evaluate.baselines import PROMPT_ROW, method_title

    res = comparison.results
    sp = res[PROMPT_ROW]
    line = f"soft prompt: accuracy {sp['accuracy']:.3f}, macro-F1 {sp['macro_f1']:.3f}"
    others = {k: m for k, m in res.items() if k != PROMPT_ROW and isinstance(m.get("macro_f1"), float)}
    if others:
        name, m = max(others.items(), key=lambda kv: kv[1]["macro_f1"])
        line += f"; best baseline by macro-F1: {method_title(name)} {m['macro_f1']:.3f} (accuracy {m['accuracy']:.3f})"
    return line


def run(args: argparse.Namespace) -> int:
    run_demo(DemoConfig(out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size,
                        max_length=args.max_length, prompt_length=args.prompt_length, dev_size=args.dev_size,
                        test_size=args.test_size, shots=args.shots, seed=args.seed, threads=args.threads or None,
                        precision=args.precision, device=args.device))
    return 0
