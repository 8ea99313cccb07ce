#!/usr/bin/env bash
# Install what the tests need (scripts/setup_env.sh), then run the whole suite, real vLLM
# CPU servers included. Extra arguments go to pytest. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export WANDB_SILENT=true HF_HUB_OFFLINE=1
set +e
python -m pytest -q "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit $status
