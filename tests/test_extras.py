"""A command whose optional part is missing stops with one line naming the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from softprompt.errors import ConfigError
from softprompt.extras import EXTRAS, missing, require


def test_require_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert missing("serve") == ["uvicorn"]
    with pytest.raises(ConfigError, match=r"^softprompt serve needs the 'serve' extra \(uvicorn not installed\): "
                                          r"pip install 'softprompt\[serve\]'$"):
        require("serve", "softprompt serve")
    assert set(EXTRAS) >= {"serve", "peft", "distributed", "eval", "parquet", "datasets"}


@pytest.mark.parametrize("blocked,argv,extra", [
    ("fastapi", ["serve", "--prompts", "."], "serve"),
    ("accelerate", ["train", "--launcher", "accelerate", "--data", "x.jsonl", "--out", "p.safetensors"], "distributed"),
    ("optuna", ["tune", "--data", "x.jsonl", "--eval-split", "0.1", "--budget", "1m", "--out", "p.safetensors"], "tune"),
])
def test_a_missing_extra_is_one_line_not_a_traceback(tmp_path, blocked, argv, extra):
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{blocked!r}] = None  # "import {blocked}" now fails
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == {blocked!r} else real(name, *a)
        from softprompt.cli import main
        sys.exit(main({argv!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip() and "[WARNING]" not in l]
    assert len(lines) == 1 and f"pip install 'softprompt[{extra}]'" in lines[0] and "Traceback" not in r.stderr, r.stderr
