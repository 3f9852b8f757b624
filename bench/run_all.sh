#!/usr/bin/env bash
# Run every benchmark on the default model, one after another (each invocation <= ~15 min on 2
# cores; about 2.5 hours in all). Results: bench/results/*.json and *.md.
# Usage: bench/run_all.sh            (from the repository root or anywhere)
#        QUICK=1 bench/run_all.sh    (smoke run on a tiny random model: minutes, numbers meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
uptime

if [[ "${QUICK:-}" == 1 ]]; then
  TINY=$($PY -c "import tempfile, softprompt.testing as t; print(t.tiny_model_dir(tempfile.mkdtemp() + '/tiny'))" | tail -n1)  # DeepSpeed may print to stdout first
  $PY bench/prompt_size.py
  $PY bench/train_speed.py --model "$TINY" --steps 3 --rounds 1 --name smoke_train_speed
  $PY bench/train_memory.py --model "$TINY" --steps 2 --name smoke_train_memory
  for task in bbc-news tweet-sentiment headlines; do
    $PY bench/quality.py --task "$task" --model "$TINY" --steps 2 --train-n 40 --eval-n 8 --max-new-tokens 4 \
      --seeds 0 --name "smoke_quality_${task//-/_}"
  done
  $PY bench/serve.py --model "$TINY" --requests 16 --rounds 1 --concurrency 4 --name smoke_serve
  $PY bench/sharded_train.py --model "$TINY" --steps 4 --rounds 1 --name smoke_sharded_train
  OMP_NUM_THREADS=1 $PY bench/many_prompts_matrix.py --model "$TINY" --quick --skip-vllm --name smoke_many_prompts_matrix  # vLLM cannot run the tiny tokenizer
  exit 0
fi

$PY bench/prompt_size.py
$PY bench/train_speed.py
$PY bench/train_speed.py --precision fp32 --name train_speed_fp32
$PY bench/train_memory.py
# Quality: each line stays within ~15 minutes; results accumulate per task across lines.
$PY bench/quality.py --task tweet-sentiment --methods baselines,softprompt,peft-pt,lora --seeds 0
$PY bench/quality.py --task tweet-sentiment --methods softprompt,peft-pt,lora --seeds 1
$PY bench/quality.py --task tweet-sentiment --methods softprompt,peft-pt,lora --seeds 2
$PY bench/quality.py --task bbc-news --methods baselines,softprompt --seeds 0,1,2
$PY bench/quality.py --task bbc-news --methods peft-pt --seeds 0
$PY bench/quality.py --task bbc-news --methods peft-pt --seeds 1
$PY bench/quality.py --task bbc-news --methods peft-pt --seeds 2
$PY bench/quality.py --task bbc-news --methods lora --seeds 0
$PY bench/quality.py --task headlines --methods baselines,softprompt --seeds 0,1,2
$PY bench/quality.py --task headlines --methods peft-pt --seeds 0
$PY bench/quality.py --task headlines --methods lora --seeds 0
$PY bench/serve.py --threads 1
$PY bench/serve.py --threads 1 --dtype bfloat16 --name serve_bf16
$PY bench/sharded_train.py
OMP_NUM_THREADS=1 $PY bench/many_prompts.py
OMP_NUM_THREADS=1 $PY bench/many_prompts_matrix.py
uptime
