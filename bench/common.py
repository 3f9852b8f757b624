"""Shared helpers for the benchmarks: machine facts and writing JSON + Markdown results.

Benchmarks are run by hand (`.venv/bin/python bench/NAME.py`), never by the test suite. Each
writes `bench/results/NAME.json` and `bench/results/NAME.md`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
# this checkout's softprompt, unless SOFTPROMPT_SRC names another checkout's src (a side-by-side run of an older commit)
sys.path.insert(0, os.environ.get("SOFTPROMPT_SRC") or str(Path(__file__).resolve().parents[1] / "src"))


CURVE_METRICS = {"classify": ("macro_f1", "accuracy"), "generate": ("rouge_l", "chrf")}
"""Task kind -> the dev metrics a learning-curve point keeps; the first is plotted and ranks points,
the second breaks ties."""


def metrics_of(point: dict) -> tuple[str, str]:
    """The curve metrics a point carries: its task kind's :data:`CURVE_METRICS` (pure)."""
    return next(ms for ms in CURVE_METRICS.values() if ms[0] in point)


def rank(point: dict) -> tuple[float, ...]:
    """What makes a dev point the best (learning_curves.py, equal_time.py): its first metric, then
    its second (pure)."""
    return tuple(point[k] for k in metrics_of(point))


def machine() -> dict[str, Any]:
    """CPU model, core count, torch version: the context every result needs."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from softprompt.precision import cpu_flags, cpu_has_native_bf16

    return {
        "cpu": cpu,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def set_threads(n: int | None) -> None:
    """``--threads``: torch CPU threads for this process (None: torch's default, one per core).

    On a shared 2-core machine, 2 OpenMP threads per process can run many times slower than 1
    when other processes hold the cores (threads spin at barriers waiting for a descheduled peer).
    """
    import torch

    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)


def add_peft_precision(ap) -> None:
    """``--peft-precision`` on a benchmark's parser: the PEFT side's forward in softprompt's ``--precision``
    rule (issue #26: every side in the fastest precision the machine has)."""
    ap.add_argument("--peft-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the PEFT side's forward: auto (bf16 autocast where the CPU has native bf16, as "
                         "softprompt's --precision auto), fp32 (as PEFT's guides run it) or bf16")


def load_average() -> float:
    """1-minute load average (how shared the machine was)."""
    return round(os.getloadavg()[0], 2)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a Markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_results(name: str, rows: Sequence[dict[str, Any]], summary: dict[str, Any] | None = None,
                  columns: Sequence[str] | None = None, notes: str = "") -> Path:
    """Write `results/NAME.json` and `results/NAME.md`; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {"benchmark": name, "machine": machine(), "summary": summary or {}, "rows": list(rows)}
    (RESULTS / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    m = info["machine"]
    bf16 = f"native bf16 ({', '.join(m['cpu_bf16_flags'])})" if m["cpu_native_bf16"] else "no native bf16"
    md = [f"## {name}", "", f"Machine: {m['cpu']} ({bf16}), {m['cores']} cores, torch {m['torch']}"
          + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + f", {m['torch_threads']} torch thread(s); "
          f"{m['date']}, load average {m['load_average_1min']} at the end.", ""]
    md.append(markdown_table(rows, columns))
    if summary:
        md += ["", "Summary: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                          for k, v in summary.items())]
    if notes:
        md += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return path
