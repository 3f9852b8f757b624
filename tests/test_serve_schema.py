"""The OpenAPI document is the contract: schemathesis drives a live server (tiny model) with cases
generated from ``/openapi.json`` (valid and invalid ones) and checks that it never answers 5xx, and
that every status, content type and response body is the one the document describes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_serve_engine import soft_base
from test_serve_http import serve, write_prompts

pytest.importorskip("schemathesis")

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = int(os.environ.get("SOFTPROMPT_SCHEMATHESIS_EXAMPLES", "12"))
"""Fuzzed cases per operation (the examples and coverage phases add their own, a few hundred in all)."""


@pytest.fixture(scope="module")
def base(model_root):
    return soft_base(model_root / "llama", "llama")


def test_the_server_answers_as_its_openapi_document_says(base, tmp_path):
    prompts = write_prompts(base, tmp_path / "prompts", ["topic", "gen"])
    # small limits keep each generated case cheap on a slow CPU; the schema carries them
    srv = serve(base, prompts, max_new_tokens=4, max_input_tokens=64, max_labels=8,
                max_batch_requests=4, max_stop=4, max_stop_chars=16, max_ensemble=2, max_upload_bytes=64 * 1024,
                request_timeout=60)
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or "st"
    cmd = [st, "run", srv.url + "/openapi.json", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
           "--phases", "examples,coverage,fuzzing", "--seed", "18", "--generation-deterministic", "--workers", "1",
           "--request-timeout", "60", "--no-color", "--warnings", "off",
           "--suppress-health-check", "too_slow"]  # generation speed on a loaded CI machine, not the server
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    finally:
        srv.stop()
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "15 selected / 15 total" in out.stdout and " generated" in out.stdout, report  # nothing skipped
