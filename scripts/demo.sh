#!/usr/bin/env bash
# The main job on an embedded default: install, make the tiny model pair, start two vLLM
# CPU servers, dual-sample the shipped prompts, print the summary, stop the servers.
# Usage: bash scripts/demo.sh [extra Hydra overrides, e.g. sample.max_tokens=64]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export WANDB_SILENT=true HF_HUB_OFFLINE=1
MODELS=.cache/tiny_models
RUN_DIR=.cache/vllm-demo
python -m dual_sampling.tiny_models "$MODELS"
trap './start_vllm.sh stop --run-dir "$RUN_DIR"' EXIT
PYTHON=python ./start_vllm.sh --cpu --run-dir "$RUN_DIR" \
  --theta "$MODELS/theta" --theta-port 8000 --target "$MODELS/target" --target-port 8001 \
  -- --max-model-len 2048
python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
  target.url=http://127.0.0.1:8001 data.prompts=dual_sampling/assets/prompts.jsonl \
  output_dir=runs/demo sample.max_tokens=48 "$@"
echo "dataset: $(pwd)/runs/demo/samples.jsonl  summary: $(pwd)/runs/demo/summary.json"
