#!/usr/bin/env bash
# Install what the tests need (scripts/setup_env.sh), then run the whole suite, real vLLM
# CPU servers included. Extra arguments go to pytest. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# Headless Chromium shows the HTML report in one test (tests/test_report.py): Debian's
# package, installed here when missing and this shell may install system packages (root +
# apt); not by setup_env.sh, since the demo needs no browser.
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium (apt-get; log: .cache/setup_env.log)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >>.cache/setup_env.log 2>&1 || { tail -n 20 .cache/setup_env.log >&2
                                      echo "test.sh: apt-get install chromium failed" >&2; exit 1; }
  else
    echo "test.sh: no /usr/bin/chromium and no root apt-get: the report's browser test will skip" >&2
  fi
fi
# DUAL_SAMPLING_EAGER: every vLLM server the tests start runs eager (start_vllm.sh): vLLM's
# torch.compile warm-up took 20-150 s of each of the suite's ~45 CPU server starts (CI log,
# 2026-12-07) and changes no token; the demo runs eager too, the benchmarks compiled
export WANDB_SILENT=true HF_HUB_OFFLINE=1 DUAL_SAMPLING_EAGER=${DUAL_SAMPLING_EAGER:-1}
set +e
python -m pytest -q "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit $status
