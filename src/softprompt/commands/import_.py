"""``softprompt import DIR --out FILE``: a PEFT prompt-tuning / P-tuning / prefix-tuning adapter -> a prompt file."""

from __future__ import annotations

import argparse
import sys

from ..artifact import STORAGE_DTYPES, shape_words
from ..errors import ConfigError
from ..tasks import TASK_KINDS


def register(sub) -> None:
    p = sub.add_parser(
        "import", help="import a PEFT prompt-tuning, P-tuning or prefix-tuning adapter as a prompt file",
        description="Read a Hugging Face PEFT PROMPT_TUNING or P_TUNING adapter directory (an input prompt) or "
                    "PREFIX_TUNING adapter directory (a deep prompt) and write a prompt file for --model (default: the default model; the adapter's own base_model_name_or_path is "
                    "recorded in extra.peft, not loaded). PEFT does not store the task, so give it here.",
    )
    p.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="the prompt file to write (.safetensors)")
    p.add_argument("--model", default=None,
                   help="base model the prompt runs on (hub id or folder); default: SmolLM2-135M-Instruct")
    p.add_argument("--task", choices=list(TASK_KINDS), default=None,
                   help="task type (default: classify if --labels is given, else none)")
    p.add_argument("--template", default=None, help='input template, e.g. "Text: {text}\\nTopic:"')
    p.add_argument("--labels", default=None, help="comma-separated class labels, in score order (classify)")
    p.add_argument("--verbalizer", default=None, help="label=words,label=words, or a JSON object/file (classify)")
    p.add_argument("--name", default=None, help="a short name for the task")
    p.add_argument("--dtype", choices=["auto", *STORAGE_DTYPES], default="auto",
                   help="storage dtype (default: auto, the adapter's own, usually float32, so nothing is rounded)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept an adapter exported by softprompt for another copy of the base model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_labels(value: str | None) -> list[str] | None:
    """``--labels a,b,c`` -> ["a", "b", "c"] (None when not given)."""
    if value is None:
        return None
    labels = [x.strip() for x in value.split(",")]
    if not all(labels):
        raise ConfigError(f"--labels: empty label in {value!r}")
    return labels


def run(args: argparse.Namespace) -> int:
    from ..base import load_base_model
    from ..data import parse_verbalizer
    from ..artifact.peft import import_peft, peft_base_name, save_imported

    labels = parse_labels(args.labels)
    verbalizer = parse_verbalizer(args.verbalizer)
    base = load_base_model(args.model)
    loaded = import_peft(args.adapter, base, task=args.task, template=args.template, labels=labels,
                         verbalizer=verbalizer, name=args.name, strict=not args.allow_other_base)
    path = save_imported(loaded, args.out, None if args.dtype == "auto" else args.dtype)
    info = loaded.meta.extra["peft"]
    stated = info.get("base_model_name_or_path")
    if stated and stated not in (base.name, args.model, peft_base_name(base.name)):
        print(f"note: the adapter names base model {stated!r}; the prompt was fingerprinted on {base.name!r} "
              "(pass --model to choose)", file=sys.stderr)
    m = loaded.meta
    print(f"imported {info['peft_type']} adapter {args.adapter} ({shape_words(m)}) "
          f"-> {path} for {base.name} (stored as {m.dtype})")
    return 0
