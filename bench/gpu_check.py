"""The prepared GPU check: training and serving of softprompt next to PEFT on random-weight models
shaped like SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B, in one short run.

Needs nothing but this tree and what a GPU machine's Python has (torch, transformers, peft): the
models are built from configs with random weights and the tokenizer is trained in-process
(softprompt.testing), so nothing is downloaded. Timings are the median of ``--steps`` steps after
``--warmup`` (CUDA synchronised); peak memory is ``torch.cuda.max_memory_allocated`` per side
(on CPU: not measured). Writes ``gpu_check.json`` + ``gpu_check.md`` into ``--out``.

- training (batch x length equal for every side, one optimizer step each): softprompt input prompt
  and deep prompt as ``softprompt train`` runs them on this device (the training objective: rank
  classification over 4 labels of 1, 1, 1 and 3 tokens, ``row_losses``; the prompt packed in front
  of each row on a GPU, shared on a CPU; Linear weights held in bf16 for a bf16 run),
  PEFT prompt tuning and PEFT LoRA r=8 (q, v) (their own ``model(**batch).loss`` on source + gold
  label), float32 and bf16 autocast.
- serving (rank classification of ``--rows`` rows over 4 labels, rows/s): the bare model (the
  limit), softprompt with 1 and with 100 prompts mixed in one batch (keys/values of each prompt
  computed once, as the server caches them), and PEFT prompt tuning with 1 and 100 prompts (PEFT
  runs one adapter per forward, so 100 prompts means one forward per prompt's rows).

Run: bash bench/gpu_check.sh OUT_DIR          (on a GPU machine; < 8 min on one H200)
     python bench/gpu_check.py --device cpu --shapes tiny --steps 1 --warmup 0 --rows 8 --out /tmp/g   (CPU smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}
"""Model shapes (LlamaConfig fields) from the models' published configs."""
LABEL_TOKENS = [[11], [12], [13], [14, 15, 16]]
"""Token ids of 4 labels shaped as a real tokenizer cuts " business", " sport", " politics" and
" science and technology" (SmolLM2's: 1, 1, 1 and 3 tokens); the in-process tokenizer would cut
them into 3-12 pieces, a label set no real task has."""
WORDS = "the a market team election phone research report said new year first over after game data".split()
TRAIN_SIDES = ("softprompt input prompt", "softprompt deep prompt", "PEFT prompt tuning", "PEFT LoRA r=8")
SERVE_SIDES = ("bare model", "softprompt, 1 prompt", "softprompt, 100 prompts", "PEFT, 1 prompt", "PEFT, 100 prompts")
PRECISIONS = ("fp32", "bf16")


def build(shape: str, device: torch.device):
    """A random-weight Llama of ``shape`` (float32) wrapped as a softprompt BaseModel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.base import wrap_base_model
    from softprompt.testing import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=400)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).eval()
    return wrap_base_model(lm, tok, name=f"random-{shape}")


def texts(n: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)) for _ in range(n)]


class Clock:
    """Median seconds of a callable over steps after warmup, and the peak memory it reached."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> dict:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {"s": statistics.median(times), "peak_mb": None if peak is None else round(peak, 1)}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def ours_train_step(base, deep: bool, sources, golds, label_ids, precision: str, plen: int = 20,
                    share: bool | None = None):
    """One optimizer step of softprompt's objective (rank classification) on a fresh prompt;
    ``share``: the input prompt's prefix shared or packed (None: the trainer's choice for the device)."""
    from softprompt.model import PromptedModel
    from softprompt.train.objective import Row, row_losses
    from softprompt.train.speed import share_prompt_prefix

    pm = PromptedModel(base)
    share = share_prompt_prefix(base.device) if share is None else share
    dev = base.device
    if deep:
        L, H, hd = base.kv_layout
        prompt = torch.nn.Parameter(torch.randn(L, 2, H, plen, hd, device=dev) * 0.02)
    else:
        prompt = torch.nn.Parameter(torch.randn(plen, base.dim, device=dev) * 0.02)
    opt = torch.optim.AdamW([prompt], lr=1e-3)
    rows = [Row(task=0, source=s, target=g) for s, g in zip(sources, golds)]

    def step():
        with autocast(dev, precision):
            loss = row_losses(pm, [prompt], rows, [label_ids], share_prefix=share).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peft_train_step(peft_model, batch, precision: str):
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with autocast(batch["input_ids"].device, precision):
            loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peft_batch(base, sources, golds, label_ids):
    from softprompt.model import IGNORE_INDEX

    seqs = [s + label_ids[g] for s, g in zip(sources, golds)]
    T = max(len(q) for q in seqs)
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([q + [pad] * (T - len(q)) for q in seqs], device=base.device)
    mask = torch.tensor([[1] * len(q) + [0] * (T - len(q)) for q in seqs], device=base.device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (s, g) in enumerate(zip(sources, golds)):
        labels[i, len(s): len(s) + len(label_ids[g])] = torch.tensor(label_ids[g])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_tuning(lm, plen: int = 20):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(lm, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=plen))


def lora(lm):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj"]))


@torch.no_grad()
def ours_serve(base, prompts, tasks, sources, label_ids, precision):
    """Rank classification of every row after its prompt; prefixes computed once (the cache)."""
    from softprompt.model import PromptedModel
    from softprompt.prefix import prefill, prefix_forward
    from softprompt.scoring import label_logprobs, source_forward

    pm = PromptedModel(base)
    with autocast(base.device, precision):
        prefix = prefix_forward(pm, prompts, tasks) if prompts else None

    def run():
        with autocast(base.device, precision):
            state = (prefill(pm, prefix, sources) if prefix is not None
                     else source_forward(pm, torch.zeros(0, base.dim, device=base.device), sources))
            return label_logprobs(pm, state, label_ids)
    return run


@torch.no_grad()
def peft_serve(peft_model, base, prompts, tasks, sources, label_ids, precision, chunk: int = 64):
    """PEFT rank classification: one adapter per forward (its prompt swapped in), one left-padded
    row per (source, label) pair; only the label positions' logits are computed (logits_to_keep)."""
    emb = peft_model.prompt_encoder["default"].embedding.weight
    pad = base.tokenizer.pad_token_id
    keep = max(len(l) for l in label_ids) + 1

    def run():
        for t in sorted(set(tasks)):
            emb.data.copy_(prompts[t])
            rows = [sources[i] for i, ti in enumerate(tasks) if ti == t]
            seqs = [s + lab for s in rows for lab in label_ids]
            for k in range(0, len(seqs), chunk):
                part = seqs[k: k + chunk]
                T = max(len(q) for q in part)
                ids = torch.tensor([[pad] * (T - len(q)) + q for q in part], device=base.device)
                mask = torch.tensor([[0] * (T - len(q)) + [1] * len(q) for q in part], device=base.device)
                with autocast(base.device, precision):
                    peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float().log_softmax(-1)
    return run


def check_shape(shape: str, args, device: torch.device) -> list[dict]:
    from softprompt.train.speed import cast_linear_weights

    base = build(shape, device)
    tok = base.tokenizer
    label_ids = LABEL_TOKENS
    train_src = [tok(t, add_special_tokens=False).input_ids[: args.length] for t in texts(args.batch, args.length)]
    golds = [i % len(LABEL_TOKENS) for i in range(args.batch)]
    serve_src = [tok(t, add_special_tokens=False).input_ids[: args.length] for t in texts(args.rows, args.length, 1)]
    clock = Clock(device, args.warmup, args.steps)
    rows = []
    g = torch.Generator().manual_seed(1)
    bank = [(torch.randn(20, base.dim, generator=g) * 0.02).to(device) for _ in range(100)]
    for precision in args.precisions.split(","):
        def add(kind, side, make, n):
            """Time the step ``make()`` builds; a side that fails is a row with its error, and the rest run."""
            row = {"model": shape, "precision": precision, "kind": kind, "side": side,
                   "seconds": None, "rows/s": None, "peak GPU MB": None, "error": None}
            try:
                result = clock(make())
                row.update({"seconds": round(result["s"], 5), "rows/s": round(n / result["s"], 1),
                            "peak GPU MB": result["peak_mb"]})
            except Exception as e:  # noqa: BLE001 - one failing side must not cost the lent GPU's other cells
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {shape} {precision} {kind} {side}: {row['seconds'] or row['error']}", flush=True)
        with cast_linear_weights(base.model, torch.bfloat16 if precision == "bf16" else None):  # as train() does
            for side, deep in (("softprompt input prompt", False), ("softprompt deep prompt", True)):
                add("train", side, lambda: ours_train_step(base, deep, train_src, golds, label_ids, precision),
                    args.batch)
        for p in (1, 100):
            tasks = [i % p for i in range(args.rows)]
            add("serve", f"softprompt, {p} prompt{'s' if p > 1 else ''}",
                lambda: ours_serve(base, bank[:p], tasks, serve_src, label_ids, precision), args.rows)
        add("serve", "bare model", lambda: ours_serve(base, [], [], serve_src, label_ids, precision), args.rows)
        pt = prompt_tuning(base.model)
        add("train", "PEFT prompt tuning",
            lambda: peft_train_step(pt, peft_batch(base, train_src, golds, label_ids), precision), args.batch)
        for p in (1, 100):
            tasks = [i % p for i in range(args.rows)]
            add("serve", f"PEFT, {p} prompt{'s' if p > 1 else ''}",
                lambda: peft_serve(pt, base, bank[:p], tasks, serve_src, label_ids, precision), args.rows)
        lm, made = pt.get_base_model(), []

        def lora_step():
            made.append(lora(lm))
            return peft_train_step(made[-1], peft_batch(base, train_src, golds, label_ids), precision)
        add("train", "PEFT LoRA r=8", lora_step, args.batch)
        base.model = made[-1].unload() if made else lm  # the base without LoRA's layers, for the next precision
        for p_ in base.model.parameters():
            p_.requires_grad_(False)
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["model", "precision", "kind", "side", "seconds", "rows/s", "peak GPU MB", "error"]
    lines = [f"# GPU check ({meta['device_name']}, {meta['date']})", "",
             f"batch {meta['batch']} x {meta['length']} tokens (training), {meta['rows']} rows (serving); "
             f"median of {meta['steps']} steps after {meta['warmup']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}, peft {meta['peft']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help=f"of {', '.join(PRECISIONS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="source tokens per row")
    ap.add_argument("--rows", type=int, default=64, help="rows per serving measurement")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    import peft
    import transformers

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (PyTorch's default, stated)
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, **{k: getattr(args, k) for k in ("batch", "length", "rows", "steps", "warmup")}}
    rows: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        try:
            rows += check_shape(shape, args, device)
        except Exception as e:  # noqa: BLE001 - e.g. a model that does not fit: the next shapes still run
            traceback.print_exc()
            rows.append({"model": shape, "precision": None, "kind": "build", "side": None, "seconds": None,
                         "rows/s": None, "peak GPU MB": None, "error": f"{type(e).__name__}: {e}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{shape}: {time.perf_counter() - t0:.0f} s", flush=True)
        result = {"meta": meta, "rows": rows}  # written after every model: a run cut short keeps what it measured
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        (out / "gpu_check.md").write_text(markdown(rows, meta))
    return result


if __name__ == "__main__":
    main()
