#!/usr/bin/env bash
# The prepared GPU check (not part of the CPU suite): --bf16, --fp16,
# --use_distributed_optimizer, the flash-attn path and resumes against the fp32 serial
# run, printed as one table (scripts/gpu_check.py). flash-attn and Transformer Engine are
# used when importable (the table says "not installed" otherwise).
#
# Which Python: $GPU_PYTHON, else python3 when its torch sees CUDA (a GPU image with
# PyTorch); megatron-core and other missing packages may travel as wheels in .whl/ (made
# here by scripts/gpu_wheels.sh) for a machine that reaches no registry. Failing both, a
# venv of its own (.venv-gpu, as scripts/setup_env.sh makes it; pip's default index then
# gives torch 2.13.0's CUDA build).
# Extra arguments go to gpu_check.py (e.g. --workdir runs/gpu_check to keep the logs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site .whl/*.whl || { echo "gpu_check: carried wheels do not install" >&2; exit 1; }
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import torch, megatron.core; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: $PY lacks CUDA torch or megatron-core; making .venv-gpu" >&2
  export VENV=${VENV:-.venv-gpu}
  bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }
  PY=$VENV/bin/python
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "gpu_check: this torch sees no CUDA device" >&2; exit 2; }
exec timeout 330 "$PY" scripts/gpu_check.py "$@"
