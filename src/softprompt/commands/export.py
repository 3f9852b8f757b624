"""``softprompt export FILE --format peft --out DIR``: write a prompt file in another tool's format."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..artifact import LoadedPrompt, load_prompt, shape_words
from ..methods import METHODS


def _export_peft(loaded: LoadedPrompt, args: argparse.Namespace) -> Path:
    from ..artifact.peft import export_peft

    base = None
    if args.model:
        from ..base import load_base_model

        base = load_base_model(args.model)
    return export_peft(loaded, args.out, base=base, base_model_name=args.base_model_name,
                       strict=not args.allow_other_base, peft_type=args.peft_type)


def _export_vllm(loaded: LoadedPrompt, args: argparse.Namespace) -> Path:
    from ..vllm.export import export_vllm

    return export_vllm(loaded, args.out)


EXPORT_FORMATS: dict[str, Callable[[LoadedPrompt, argparse.Namespace], Path]] = {
    "peft": _export_peft,
    "vllm": _export_vllm,
}
"""Export formats by ``--format`` name; each writes ``--out`` and returns it."""
EXPORT_WHAT = {"peft": "adapter", "vllm": "prompt_embeds files"}


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a prompt file to another format (a PEFT adapter, vLLM prompt_embeds files)",
        description="Write a prompt file as a Hugging Face PEFT adapter directory (adapter_config.json + "
                    "adapter_model.safetensors) that peft.PeftModel.from_pretrained loads: PROMPT_TUNING for an input "
                    "prompt, PREFIX_TUNING for a deep prompt; or (--format vllm, input prompts only) "
                    "prompt.safetensors + prompt.json for building vLLM prompt_embeds.",
    )
    p.add_argument("file", help="a .safetensors prompt file")
    p.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="peft", help="output format (default: peft)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--peft-type", choices=[m.peft_type for m in METHODS.values()], default=None,
                   help="PEFT adapter type (default: the prompt's own: "
                        + ", ".join(f"{m.peft_type} for {m.a}" for m in METHODS.values()) + "; the other is refused)")
    p.add_argument("--model", default=None,
                   help="check the prompt against this base model (hub id or folder) and take num_layers/"
                        "num_attention_heads from it; default: the prompt's base model's config if available locally")
    p.add_argument("--base-model-name", default=None,
                   help="base_model_name_or_path to record (default: the prompt's base model)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="with --model: accept a prompt whose fingerprint is another copy of the model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_prompt(args.file)
    out = EXPORT_FORMATS[args.format](loaded, args)
    m = loaded.meta
    print(f"wrote {args.format} {EXPORT_WHAT[args.format]} {out} ({shape_words(m)}, base {m.base_model})")
    return 0
