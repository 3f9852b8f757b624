"""A straightforward PEFT serving baseline: FastAPI + uvicorn around one ``PeftModel`` holding one
prompt-tuning adapter per task, one request at a time, the prompt run through the model on every call.

It speaks the same two routes as ``softprompt serve`` (``POST /v1/classify`` with ``text`` and
``prompt``; ``POST /v1/generate`` with ``text``, ``prompt`` and ``max_new_tokens``) so one client
drives both. Classification scores every label the same way (summed label-token log-probs), with
the C candidate continuations in one padded forward pass; generation is PEFT's ``generate``.

Run by bench/serve.py:  python bench/peft_server.py --adapters DIR --port N [--model M]
``DIR`` holds one PEFT adapter folder per prompt (``softprompt export``) and ``tasks.json``
({name: {"kind", "template", "labels"}}). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import torch
from pydantic import BaseModel

import common  # noqa: F401  (puts src/ on the path)
from softprompt.data import TaskSpec
from softprompt.serve.config import is_loopback


class Classify(BaseModel):
    text: str
    prompt: str


class Generate(BaseModel):
    text: str
    prompt: str
    max_new_tokens: int = 32


def build_app(model_path: str, adapters: Path):
    from fastapi import FastAPI, HTTPException
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = json.loads((adapters / "tasks.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    names = sorted(tasks)
    model = PeftModel.from_pretrained(lm, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    model.eval()
    specs = {n: TaskSpec(t["kind"], t["template"], labels=t.get("labels"), max_length=512) for n, t in tasks.items()}
    lock = threading.Lock()  # one request at a time
    app = FastAPI()

    def spec_of(name: str, kind: str) -> TaskSpec:
        if name not in specs or specs[name].kind != kind:
            raise HTTPException(404, f"no {kind} prompt {name!r}")
        return specs[name]

    @app.post("/v1/classify")
    def classify(body: Classify):
        spec = spec_of(body.prompt, "classify")
        src = spec.source_ids(tok, body.text)
        labels = spec.label_ids(tok)
        rows = [src + lab for lab in labels]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with lock, torch.inference_mode():
            model.set_adapter(body.prompt)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (C, P + T, V): prompt prepended
        P = logits.shape[1] - T
        scores = []
        for i, lab in enumerate(labels):
            pos = P + len(src) - 1 + torch.arange(len(lab))  # positions predicting the label tokens
            lp = logits[i, pos].float().log_softmax(-1)  # (L, V)
            scores.append(float(lp.gather(1, torch.tensor(lab)[:, None]).sum()))
        probs = torch.tensor(scores).softmax(0).tolist()
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"label": spec.labels[best], "probs": dict(zip(spec.labels, probs)), "scores": [scores],
                "prompts": [body.prompt]}

    @app.post("/v1/generate")
    def generate(body: Generate):
        spec = spec_of(body.prompt, "generate")
        ids = torch.tensor([spec.source_ids(tok, body.text)])
        with lock, torch.inference_mode():
            model.set_adapter(body.prompt)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=body.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return {"text": tok.decode(new, skip_special_tokens=True).strip(), "tokens": len(new), "prompt": body.prompt}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", required=True, type=Path)
    ap.add_argument("--model", required=True, help="model folder (the same weights softprompt serves)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = ap.parse_args()
    common.set_threads(args.threads)
    if not is_loopback(args.host):
        raise SystemExit("the PEFT baseline server binds loopback addresses only")
    import uvicorn

    uvicorn.run(build_app(args.model, args.adapters), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
