#!/usr/bin/env bash
# Runs the whole test suite (installs everything first) and prints the 25 slowest tests.
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }
.venv/bin/python -m pytest tests --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
