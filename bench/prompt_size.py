"""Bytes per prompt file on the default model, at 20 and 100 virtual tokens, per storage dtype.

Run: .venv/bin/python bench/prompt_size.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import write_results

from softprompt import PromptMeta, SoftPrompt, load_base_model, save_prompt


def main() -> None:
    base = load_base_model()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for length in (20, 100):
            p = SoftPrompt.initialize(base.embedding, base.tokenizer, length, "vocab")
            for dtype in ("float16", "bfloat16", "float32"):
                meta = PromptMeta.for_base(base, length, task="classify", template="Text: {text}\nTopic:",
                                           labels=["business", "entertainment", "politics", "sport", "tech"],
                                           training={"steps": 100, "best_accuracy": 0.9})
                path = save_prompt(Path(d) / f"p{length}{dtype}.safetensors", p.weight, meta, dtype=dtype)
                size = path.stat().st_size
                tensor = length * base.dim * (4 if dtype == "float32" else 2)
                rows.append({"virtual tokens": length, "dtype": dtype, "file bytes": size, "tensor bytes": tensor,
                             "metadata bytes": size - tensor, "KB": round(size / 1000, 1)})
    write_results("prompt_size", rows, notes=f"Base model: {base.name} (d = {base.dim}).")


if __name__ == "__main__":
    main()
