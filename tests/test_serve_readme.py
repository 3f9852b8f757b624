"""The README's Serving section runs as written: its curl commands against a live server (tiny
model), its Python example on the default model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from softprompt import PromptMeta, SoftPrompt, save_prompt
from softprompt.serve import Engine, EngineConfig, ServeConfig
from softprompt.serve.http import start_server

README = Path(__file__).resolve().parents[1] / "README.md"
from docs_examples import blocks, page  # noqa: E402
DEMO_LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def section_blocks(lang: str) -> list[str]:
    return blocks(page("Serving"), lang)


def commands(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("curl ")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_examples(tiny, tmp_path):
    (tmp_path / "demo-out").mkdir()
    w = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 20, "labels", labels=DEMO_LABELS).weight
    meta = PromptMeta.for_base(tiny, 20, task="classify", name="topic", template="Text: {text}\nTopic:", labels=DEMO_LABELS)
    save_prompt(tmp_path / "demo-out" / "topic.safetensors", w, meta)
    (tmp_path / "prompts").mkdir()
    shutil.copy(tmp_path / "demo-out" / "topic.safetensors", tmp_path / "prompts")
    config = ServeConfig(prompts_dir=str(tmp_path / "prompts"), port=0)
    engine = Engine(tiny, config.engine, prompts_dir=config.prompts_dir)
    engine.bank.load_all()
    srv = start_server(config, engine)
    try:
        cmds = [c for b in section_blocks("bash") for c in commands(b)]
        assert len(cmds) >= 10
        hostport = srv.url.removeprefix("http://")
        for cmd in cmds:
            assert "localhost:8000" in cmd
            out = subprocess.run(["bash", "-c", cmd.replace("localhost:8000", hostport)], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and out.stdout, (cmd, out.stderr)
            assert '"error"' not in out.stdout, (cmd, out.stdout)
            if "stream" in cmd:
                assert out.stdout.rstrip().split("\n\n")[-1].startswith("event: done")
            elif "/metrics" not in cmd:
                json.loads(out.stdout)
    finally:
        srv.stop()


@pytest.mark.real_model
def test_readme_python_example(default_base, tmp_path, monkeypatch, capsys):
    (python,) = section_blocks("python")
    w = SoftPrompt.initialize(default_base.embedding, default_base.tokenizer, 20, "labels", labels=DEMO_LABELS).weight
    save_prompt(tmp_path / "prompts" / "topic.safetensors", w,
                PromptMeta.for_base(default_base, 20, task="classify", template="Text: {text}\nTopic:", labels=DEMO_LABELS))
    monkeypatch.chdir(tmp_path)
    import softprompt

    monkeypatch.setattr(softprompt, "load_base_model", lambda *a, **k: default_base)  # already loaded once
    exec(compile(python, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "business" in out and out.count("\n") >= 3
