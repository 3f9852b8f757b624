"""The evaluation report: one self-contained HTML file (plots embedded as base64 PNG), PNG copies
next to it.

Plots: training curves (from the run's ``metrics.jsonl``, when there is one), the methods side by
side, and the soft prompt's confusion matrix (classification). matplotlib is used through its
object API with the Agg canvas, never pyplot, so no global backend state is touched.

Not here: computing metrics (metrics.py, baselines.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Sequence

from ..artifact import atomic_write_bytes
from ..errors import ConfigError, DataError
from ..extras import require
from ..methods import METHODS
from ..sources import jsonl_objects
from ..tasks import TASKS, task
from .baselines import COLUMNS, PROMPT_ROW, Comparison, method_title


LOG_NAME = "metrics.jsonl"
NOT_PLOTTED = {"step", "epoch", "lr", "learning_rate", "seconds", "time", "elapsed", "tokens", "examples", "n",
               "tokens_per_s", "examples_per_s", "grad_norm", "best"}
"""Numeric log fields that are not loss or metric curves."""

COMPARED: dict[str, list[tuple[str, str]]] = {k: list(t.report_columns) for k, t in TASKS.items()}


# ----------------------------------------------------------------------------- the training log


def read_log(path: str | Path) -> list[dict]:
    """Records of a training ``metrics.jsonl`` (one JSON object per line); DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such training log")
    return [rec for _, rec in jsonl_objects(path)]


def find_log(prompt_path: str | Path, training: dict | None = None) -> Path | None:
    """The training log of a prompt file: named in its training summary, or ``metrics.jsonl`` in
    the run folder training writes next to it (``<name>.run/``, or ``run/`` for several tasks), or
    next to it; None when there is none."""
    p = Path(prompt_path)
    named = [(training or {}).get(k) for k in ("log", "metrics_log", "metrics", "run_dir", "out")]
    cands = []
    for v in named:
        if isinstance(v, str) and v:
            cands += [Path(v), Path(v) / LOG_NAME, p.parent / v, p.parent / v / LOG_NAME]
    # train/loop.py writes <out>.run/metrics.jsonl (the name up to its first dot), or run/ for several tasks
    cands += [p.parent / f"{p.name.split('.')[0]}.run" / LOG_NAME, p.parent / f"{p.stem}.run" / LOG_NAME,
              p.parent / "run" / LOG_NAME, p.parent / LOG_NAME]
    return next((c for c in cands if c.is_file()), None)


def curve_series(records: Sequence[dict], task: str | None = None) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Group a log's numeric fields into ``{"loss": {name: (steps, values)}, "metric": {...}}`` (pure).

    Training's ``metrics.jsonl`` has step records (``{"step", "loss", "lr", ...}``) and evaluation
    records (``{"step", "eval": {task: {"accuracy": ..., "log_loss": ...}}}``); evaluation values
    become ``dev/<metric>`` (``dev/<task>/<metric>`` when the record has several tasks and ``task``
    is not one of them). Fields whose name contains "loss" are losses, other numeric fields metrics;
    bookkeeping (``lr``, ``elapsed``, ...) is left out, and so is a record without ``step``.
    """
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {"loss": {}, "metric": {}}

    def add(name: str, step: float, v) -> None:
        if name.rsplit("/", 1)[-1] in NOT_PLOTTED or isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if not math.isfinite(v):
            return
        xs, ys = out["loss" if "loss" in name else "metric"].setdefault(name, ([], []))
        xs.append(float(step))
        ys.append(float(v))

    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        evals = rec.get("eval")
        if isinstance(evals, dict):
            chosen = {task: evals[task]} if task in evals else evals
            for name, m in chosen.items():
                prefix = "dev/" if len(chosen) == 1 else f"dev/{name}/"
                for k, v in (m.items() if isinstance(m, dict) else []):
                    add(prefix + k, step, v)
        prefix = next((f"{rec[k]}/" for k in ("split", "phase") if isinstance(rec.get(k), str)), "")
        for k, v in rec.items():
            add(prefix + k, step, v)
    return out


# ----------------------------------------------------------------------------- plots


def _figure(w: float, h: float):
    require("eval", "--report")
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_curves(records: Sequence[dict], task: str | None = None) -> bytes | None:
    """Loss and metric curves over steps (PNG), or None when the log has no curves."""
    series = curve_series(records, task)
    groups = [(g, s) for g, s in series.items() if s]
    if not groups:
        return None
    fig = _figure(5.2 * len(groups), 3.6)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (group, s) in zip(axes, groups):
        for name, (xs, ys) in sorted(s.items()):
            line, = ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name,
                            alpha=0.35 if len(xs) >= 30 else 1.0)
            if len(xs) >= 30:  # noisy per-step values: add a running mean
                k = max(5, len(xs) // 20)
                ax.plot(xs[k - 1 :], [sum(ys[i - k + 1 : i + 1]) / k for i in range(k - 1, len(ys))],
                        color=line.get_color(), label=f"{name} (mean of {k})")
        ax.set_xlabel("step")
        ax.set_title("loss" if group == "loss" else "metrics")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def plot_comparison(result: Comparison) -> bytes:
    """Each method's headline metrics as grouped horizontal bars (PNG)."""
    metrics = COMPARED[result.spec.kind]
    names = list(result.results)
    fig = _figure(7.5, 0.9 + 0.55 * len(names) * len(metrics) ** 0.5 + 0.4)
    ax = fig.subplots()
    h = 0.8 / len(metrics)
    for j, (key, title) in enumerate(metrics):
        ys = [i + (j - (len(metrics) - 1) / 2) * h for i in range(len(names))]
        vals = [float(result.results[n].get(key, 0.0)) for n in names]
        bars = ax.barh(ys, vals, height=h * 0.92, label=title)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], padding=3, fontsize=8)
    ax.set_yticks(range(len(names)), [method_title(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"score on {result.n} examples")
    ax.set_title("soft prompt vs baselines")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(metrics), fontsize=8, frameon=False)
    return _png(fig)


def plot_confusion(m: dict, title: str = "soft prompt: confusion matrix") -> bytes:
    """Confusion matrix heatmap (rows = gold, colour = share of the row), counts written in (PNG)."""
    labels, matrix = m["confusion"]["labels"], m["confusion"]["matrix"]
    C = len(labels)
    size = 2.6 + 0.55 * C
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    shares = [[v / max(1, sum(row)) for v in row] for row in matrix]
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=9,
                    color="white" if shares[i][j] > 0.6 else "black")
    ax.set_xticks(range(C), labels, rotation=35, ha="right")
    ax.set_yticks(range(C), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of gold row")
    return _png(fig)


# ----------------------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%}
.note{color:#666;font-size:0.9em}code{background:#f4f4f4;padding:1px 4px}"""


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _prompt_shape(meta) -> str:
    """What the prompt is, in words: an input prompt's (P, d) or a deep prompt's per-layer keys/values."""
    return METHODS[meta.method].report_shape(meta)


def render_html(result: Comparison, plots: dict[str, bytes], log_note: str) -> str:
    """The report page; ``plots`` maps "curves" / "comparison" / "confusion" to PNG bytes."""
    meta = result.meta
    cols = COLUMNS[result.spec.kind]
    rows = [[method_title(n)] + [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-" for k, _ in cols]
            + [f"{m.get('seconds', 0):.1f}", m.get("setup", "")] for n, m in result.results.items()]
    parts = [
        f"<h1>softprompt evaluation: {html.escape(meta.name or Path(result.prompt_path).stem)}</h1>",
        _table(["", ""], [
            ["prompt file", result.prompt_path], ["base model", meta.base_model],
            ["prompt", _prompt_shape(meta)],
            ["task", result.spec.kind], ["template", repr(result.spec.template)],
            ["labels", ", ".join(result.spec.labels or []) or "-"],
            ["eval data", f"{result.data_path} ({result.n} examples, max length {result.spec.max_length} tokens, "
                          f"{result.precision})"],
            ["training file", result.train_path or "-"],
        ]),
        "<h2>Comparison</h2>",
        _table(["method"] + [h for _, h in cols] + ["seconds", "setup"], rows),
    ]
    parts += [f'<p class="note">{html.escape(method_title(k))} skipped: {html.escape(v)}</p>'
              for k, v in result.skipped.items()]
    parts.append(_img(plots["comparison"], "comparison"))
    if "confusion" in plots:
        pm = result.results[PROMPT_ROW]
        per = [[l, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
               for l, c in pm["per_class"].items()]
        parts += ["<h2>Soft prompt per class</h2>", _table(["class", "precision", "recall", "F1", "support"], per),
                  _img(plots["confusion"], "confusion matrix")]
    parts.append("<h2>Training</h2>")
    if meta.training:
        parts.append(_table(["", ""], [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
                                       for k, v in meta.training.items()]))
    parts.append(f'<p class="note">{html.escape(log_note)}</p>')
    if "curves" in plots:
        parts.append(_img(plots["curves"], "training curves"))
    title = html.escape(f"softprompt evaluation: {meta.name or Path(result.prompt_path).stem}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>'
            f"</head><body>{''.join(parts)}</body></html>\n")


def write_report(path: str | Path, result: Comparison, log: str | Path | None = None) -> list[Path]:
    """Write the HTML report and its PNG copies (``<stem>-<plot>.png`` next to it), atomically.

    Args:
        log: the training ``metrics.jsonl``; default: found from the prompt file (``find_log``).
            Without one the report says so and has no curves.
    Returns:
        The files written, the HTML first.
    """
    path = Path(path)
    plots = {"comparison": plot_comparison(result)}
    if task(result.spec.kind).labelled:  # a label set: its confusion matrix
        plots["confusion"] = plot_confusion(result.results[PROMPT_ROW])
    log_path = Path(log) if log else find_log(result.prompt_path, result.meta.training)
    if log_path is None:
        log_note = "No training log (metrics.jsonl) was found for this prompt, so there are no training curves."
    else:
        curves = plot_curves(read_log(log_path), result.meta.name)
        if curves is None:
            log_note = f"The training log {log_path} has no step-wise losses or metrics to plot."
        else:
            plots["curves"] = curves
            log_note = f"Training curves from {log_path}."
    atomic_write_bytes(path, render_html(result, plots, log_note).encode("utf-8"))
    written = [path]
    for name, png in plots.items():
        p = path.with_name(f"{path.stem}-{name}.png")
        atomic_write_bytes(p, png)
        written.append(p)
    return written
