"""softprompt as a package: the wheel `python -m build` makes installs into a fresh venv and works
there (`softprompt --help`, a two-step train on a tiny model), from the wheel, not this checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from trainkit import easy_classification

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build")


def test_the_wheel_installs_into_a_fresh_venv_and_trains(tmp_path, tiny_dir):
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "License classifiers are deprecated" not in r.stderr and "SetuptoolsDeprecationWarning" not in r.stderr
    (wheel,) = (tmp_path / "dist").glob("softprompt-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, transformers, ...) from this environment, without downloading them again;
    # a path added by a .pth file is no site dir, so this checkout's editable install stays out
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import softprompt; print(softprompt.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(site), where  # the installed wheel, not the checkout
    cli = env_dir / "bin" / "softprompt"
    assert "train" in subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120).stdout
    data, _ = easy_classification(tmp_path / "data", n_train=8, n_dev=4)
    r = subprocess.run([str(cli), "train", "--data", str(data), "--model", str(tiny_dir), "--out",
                        str(tmp_path / "p.safetensors"), "--max-steps", "2", "--batch-size", "4", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "p.safetensors").is_file()
