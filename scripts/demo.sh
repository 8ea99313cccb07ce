#!/usr/bin/env bash
# The main job on an embedded default: install, make the tiny model pair, serve both models
# in ONE vLLM CPU engine (start_vllm.sh --fused: the exact full-vocabulary mixture sampled in
# vLLM's own loop), dual-sample the shipped prompts, print the summary, stop the server.
# Usage: bash scripts/demo.sh [--two-servers] [extra Hydra overrides, e.g. sample.max_tokens=64]
#   --two-servers: the same on two vLLM servers, one per model (the session transport:
#                  each step's top-k of both, merged by the coordinator); for pairs that one
#                  engine cannot hold, or models on different machines.
set -euo pipefail
cd "$(dirname "$0")/.."
TWO_SERVERS=0
if [[ "${1:-}" == "--two-servers" ]]; then TWO_SERVERS=1; shift; fi
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export WANDB_SILENT=true HF_HUB_OFFLINE=1
MODELS=.cache/tiny_models
RUN_DIR=.cache/vllm-demo
PROMPTS=dual_sampling/assets/prompts.jsonl
python -m dual_sampling.tiny_models "$MODELS"
trap './start_vllm.sh stop --run-dir "$RUN_DIR"' EXIT
if [[ $TWO_SERVERS == 1 ]]; then
  OUT=runs/demo-two-servers
  PYTHON=python ./start_vllm.sh --cpu --run-dir "$RUN_DIR" \
    --theta "$MODELS/theta" --theta-port 8000 --target "$MODELS/target" --target-port 8001 \
    -- --max-model-len 2048
  python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
    target.url=http://127.0.0.1:8001 data.prompts="$PROMPTS" output_dir="$OUT" \
    sample.max_tokens=48 "$@"
else
  OUT=runs/demo
  PYTHON=python ./start_vllm.sh --cpu --fused --run-dir "$RUN_DIR" \
    --theta "$MODELS/theta" --target "$MODELS/target" --port 8000 -- --max-model-len 2048
  python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
    data.prompts="$PROMPTS" output_dir="$OUT" sample.max_tokens=48 "$@"
fi
echo "dataset: $(pwd)/$OUT/samples.jsonl  summary: $(pwd)/$OUT/summary.json"
