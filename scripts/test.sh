#!/usr/bin/env bash
# Runs the whole test suite (installs everything first) and prints the slowest tests.
# Extra arguments go to pytest (test paths among them: one session of just those).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }
# Python caches the project's compiled modules (__pycache__/, git-ignored) even where the
# environment asks it not to: each of the suite's ~100 Python processes compiled them anew
# (about 0.1 s each, and 1.5 s for each session's collection).
unset PYTHONDONTWRITEBYTECODE

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
# Two sessions side by side when the whole suite runs (no test path given): the launcher's
# tests (tests/launch: real torchrun and Slurm launches, mostly waiting on their
# subprocesses) beside all the others (CPU-bound, in-process and in the shared run_many.py
# workers). One session runs the launcher's tests one after another on ~1.3 cores, so
# alone it would leave most of a core idle for minutes; side by side both cores stay
# busy. Each session has its own workers, temporary directory and leftover-process check;
# the launcher session's report is printed after the other's. The real SmolLM2's tests
# (tests/tools/test_real_model.py: a minute of CPU, mostly in-process) run in the
# launcher's session: it ends a minute and a half before the other, which would then run
# alone on under one and a half cores.
beside=(tests/launch tests/tools/test_real_model.py)
paths=0
for arg in "$@"; do
  case "$arg" in -*) ;; *) paths=1 ;; esac
done
if [ "$paths" -eq 1 ]; then
  .venv/bin/python -m pytest --durations=25 "$@"
  rc=$?
else
  started=$SECONDS
  launcher_report="$(mktemp)"
  .venv/bin/python -m pytest "${beside[@]}" --durations=10 "$@" >"$launcher_report" 2>&1 &
  launcher=$!
  .venv/bin/python -m pytest tests "${beside[@]/#/--ignore=}" --durations=25 "$@"
  rc=$?
  wait "$launcher"
  launcher_rc=$?
  echo
  echo "== the launcher's tests (${beside[*]}), run beside the others =="
  cat "$launcher_report"
  rm -f "$launcher_report"
  if [ "$rc" -eq 0 ]; then rc=$launcher_rc; fi
  echo "the whole suite took $((SECONDS - started)) s of pytest (two sessions side by side)"
fi
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
