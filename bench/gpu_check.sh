#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): run on a GPU machine from the repository root with
# the machine's own Python (torch, transformers, peft); nothing is downloaded. Usage:
#   bash bench/gpu_check.sh OUT_DIR [extra gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_check.sh OUT_DIR}"
shift
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 470 python3 bench/gpu_check.py --out "$out" "$@"
