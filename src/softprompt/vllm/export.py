"""``softprompt export FILE --format vllm --out DIR``: what any client needs to build ``prompt_embeds``.

DIR holds two files, readable without softprompt:

- ``prompt.safetensors``: tensor ``prompt`` (P, d), in the prompt file's storage dtype;
- ``prompt.json``: the base model, the template and how to tokenize around it, the labels and
  their words (classification), and the encoding vLLM expects.

A request's input is ``[prompt ; embed_tokens(tokenizer(template with the text))]``, sent to
``vllm serve MODEL --enable-prompt-embeds`` as base64 of ``torch.save`` (README: "Serving on vLLM").

Not here: the client (client.py), which reads prompt files directly.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import STORAGE_DTYPES, LoadedPrompt, atomic_write_bytes, safetensors_bytes
from ..methods import check_backend
from ..tasks import TASKS

EXPORT_FORMAT_VERSION = 1


def export_vllm(loaded: LoadedPrompt, out: str | Path) -> Path:
    """Write ``prompt.safetensors`` + ``prompt.json`` into ``out`` (created); returns ``out``.
    A deep prompt is refused: vLLM's ``prompt_embeds`` are input embeddings only."""
    m = loaded.meta
    check_backend(m.method, "vllm", str(loaded.path or "prompt"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = m.dtype if m.dtype in STORAGE_DTYPES else "float32"
    tensor = loaded.tensor.to(STORAGE_DTYPES[dtype]).contiguous()  # (P, d)
    atomic_write_bytes(out / "prompt.safetensors", safetensors_bytes({"prompt": tensor}, {"format": "pt"}))
    placeholder = "{" + TASKS[m.task].placeholder + "}" if m.task in TASKS else None
    labels = list(m.labels or [])
    verbalizer = m.verbalizer or {}
    info = {
        "format": "softprompt-vllm",
        "format_version": EXPORT_FORMAT_VERSION,
        "name": m.name,
        "base_model": m.base_model,
        "fingerprint": m.fingerprint,
        "length": m.length,
        "dim": m.dim,
        "dtype": dtype,
        "task": m.task,
        "template": m.template,
        "placeholder": placeholder,
        "source": "tokenizer(template with the text in place of placeholder, add_special_tokens=True)",
        "labels": labels or None,
        "label_words": [verbalizer.get(label, label) for label in labels] or None,
        "label_lead": None if m.template is None else ("" if m.template[-1:].isspace() else " "),
        "label_tokens": "tokenizer(label_lead + word, add_special_tokens=False); a label's score is the "
                        "summed log-probability of its tokens; softmax over labels gives class probabilities",
        "prompt_embeds": "base64 of torch.save(concat([prompt, embed_tokens(source ids)]) as a (P + T, d) "
                         "float tensor), in the prompt_embeds field of POST /v1/completions",
    }
    atomic_write_bytes(out / "prompt.json", (json.dumps(info, indent=2) + "\n").encode())
    return out
