#!/usr/bin/env bash
# Runs the whole test suite (installs everything first) and prints the 25 slowest tests.
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }

# The real-Slurm tests (tests/launch/) start their own slurmctld and slurmd: install Slurm
# (Debian packages) when a binary is missing and we may (root, apt-get). Idempotent and
# quiet; without it those tests fail and say what to install.
slurm_missing() {
  local name
  for name in sbatch slurmctld slurmd; do
    PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v "$name" >/dev/null || return 0
  done
  return 1
}
if slurm_missing && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "== installing Slurm (slurmctld slurmd slurm-client) with apt-get ==" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q slurmctld slurmd slurm-client >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client >/dev/null; }; } \
    || echo "WARNING: installing Slurm failed: the tests in tests/launch/ that need it will fail" >&2
fi
.venv/bin/python -m pytest tests --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
