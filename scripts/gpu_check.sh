#!/usr/bin/env bash
# The fused engine on the first GPU that comes along, in one command (sized for 8 minutes on one
# NVIDIA GPU with nothing installed): install dual_sampling[gpu,test] (the pinned vLLM) into
# .venv-gpu, make a Qwen2.5-0.5B/1.5B-shaped pair with random weights (no downloads), serve
# each model alone and then both fused with vLLM's GPU defaults, measure tokens/s at 32 and
# 256 prompts, recompute a few sequences with transformers on the GPU, print one table and
# write it to $OUT/gpu_check.json when OUT is set (experiments/gpu_check.py has the details).
#
#   bash scripts/gpu_check.sh                 # GPU
#   bash scripts/gpu_check.sh --cpu [--prompts 8 32 --max-tokens 16]
#                                             # CPU, tiny shapes, in the current environment
#                                             # (scripts/setup_env.sh's); CI runs this
# Extra arguments go to experiments/gpu_check.py. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu "* ]]; then
  PY="${PYTHON:-python}"
else
  if [[ ! -x .venv-gpu/bin/python ]]; then "${PYTHON:-python3}" -m venv .venv-gpu; fi
  PY=.venv-gpu/bin/python
  mkdir -p .cache
  echo "installing dual_sampling[gpu,test] into .venv-gpu (log: .cache/gpu_check_install.log)"
  if ! "$PY" -m pip install --quiet -e ".[gpu,test]" >.cache/gpu_check_install.log 2>&1; then
    tail -n 30 .cache/gpu_check_install.log >&2
    echo "gpu_check.sh: pip install failed; full log in .cache/gpu_check_install.log" >&2
    exit 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
export HF_HUB_OFFLINE=1 WANDB_SILENT=true PYTHON="$PY"
exec "$PY" experiments/gpu_check.py "$@"
