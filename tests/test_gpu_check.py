"""The prepared GPU check (bench/gpu_check.py) runs end to end on the CPU path with a tiny shape
and writes every cell it promises, so it is ready to run unchanged when a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    return gc


TINY = ["--device", "cpu", "--shapes", "tiny", "--steps", "1", "--warmup", "0", "--rows", "6", "--batch", "2",
        "--length", "12"]


def test_gpu_check_cpu_path_writes_every_cell(tmp_path):
    gc = load()
    gc.main([*TINY, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    cells = {(r["precision"], r["kind"], r["side"]) for r in result["rows"]}
    want = {(p, "train", s) for p in gc.PRECISIONS for s in gc.TRAIN_SIDES}
    want |= {(p, "serve", s) for p in gc.PRECISIONS for s in gc.SERVE_SIDES}
    assert cells == want
    assert all(r["seconds"] > 0 and r["rows/s"] > 0 and r["error"] is None for r in result["rows"])
    assert (tmp_path / "gpu_check.md").read_text().count("| tiny |") == len(want)
    assert (ROOT / "bench" / "gpu_check.sh").read_text().count("gpu_check.py") >= 1


def test_a_failing_side_is_a_row_with_its_error_and_the_others_still_run(tmp_path, monkeypatch):
    gc = load()

    def broken(lm):
        raise RuntimeError("CUDA out of memory (posed)")
    monkeypatch.setattr(gc, "lora", broken)
    gc.main([*TINY, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    failed = [r for r in rows if r["error"]]
    assert {r["side"] for r in failed} == {"PEFT LoRA r=8"} and len(failed) == len(gc.PRECISIONS)
    assert failed[0]["error"] == "RuntimeError: CUDA out of memory (posed)" and failed[0]["seconds"] is None
    assert sum(r["seconds"] is not None for r in rows) == len(rows) - len(failed)
