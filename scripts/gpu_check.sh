#!/usr/bin/env bash
# The prepared GPU check (not part of the CPU suite): on a machine with CUDA, from a fresh
# clone, creates its own venv (.venv-gpu, as scripts/setup_env.sh does; pip's default index
# then gives torch 2.13.0's CUDA build) and runs scripts/gpu_check.py: --bf16, --fp16,
# --use_distributed_optimizer, the flash-attn path and resumes against the fp32 serial run,
# printed as one table. flash-attn and Transformer Engine are used when importable in that
# venv (install them there yourself; the table says "not installed" otherwise).
# Extra arguments go to gpu_check.py (e.g. --workdir runs/gpu_check to keep the logs).
set -uo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv-gpu}
bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "gpu_check: this torch sees no CUDA device" >&2; exit 2; }
exec timeout 330 "$VENV/bin/python" scripts/gpu_check.py "$@"
