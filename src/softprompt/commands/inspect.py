"""``softprompt inspect FILE``: show a prompt file's metadata."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..artifact import load_prompt, shape_words
from ..methods import METHODS


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a prompt file's metadata", description="Show a prompt file's metadata.")
    p.add_argument("file", help="a .safetensors prompt file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=run)


def describe(path: str) -> dict:
    """Metadata of a prompt file as a plain dict, plus its size, tensor shape and statistics
    (``norm_mean``: mean L2 norm of a virtual token's embedding, or of a deep prompt's key/value vectors)."""
    loaded = load_prompt(path)
    info = asdict(loaded.meta)
    info.pop("sketch", None)
    t = loaded.tensor  # (P, d) or (layers, 2, kv_heads, P, head_dim)
    info["file_bytes"] = Path(path).stat().st_size
    info["shape"] = list(t.shape)
    info["shape_words"] = shape_words(loaded.meta)
    info["norm_mean"] = round(float(t.norm(dim=-1).mean()), 4)
    if info.get("calibration") is None:  # the output of files without calibration is unchanged
        info.pop("calibration", None)
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    rows = [
        ("file", f"{args.file} ({info['file_bytes']:,} bytes, format {info['format_version']})"),
        ("name", info.get("name") or "-"),
        ("task", info.get("task") or "-"),
        ("base model", f"{info['base_model']} (fingerprint {info['fingerprint'][:12]})"),
        ("method", f"{info['method']} ({METHODS[info['method']].title})"),  # "prefix (deep prompt)"
        ("prompt", f"{info['shape_words'].split(': ', 1)[1]}, stored as {info['dtype']}"),
        ("template", json.dumps(info["template"]) if info.get("template") else "-"),
    ]
    if info.get("labels"):
        verb = info.get("verbalizer") or {}
        rows.append(("labels", ", ".join(f"{l} -> {verb[l]!r}" if l in verb and verb[l] != l else l for l in info["labels"])))
    if info.get("calibration"):
        c = info["calibration"]
        rows.append(("calibration", ", ".join(f"{l} {b:+.2f}" for l, b in zip(info["labels"], c["biases"]))
                     + f" (label biases; dev {c['metric']} {c['dev_before']:.4f} -> {c['dev_after']:.4f})"))
    for k, v in (info.get("training") or {}).items():
        rows.append((f"training.{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    for k, v in (info.get("extra") or {}).items():
        rows.append((f"extra.{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    rows.append(("created", f"{info['created']} by softprompt {info['softprompt_version']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
