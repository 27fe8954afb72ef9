#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI) before carrying the tree to a GPU machine that
# reaches nothing: downloads into .whl/ (git-ignored) the wheels that a GPU image with
# PyTorch, transformers and sentencepiece lacks, for its Python (default 3.12), so that
# scripts/gpu_check.sh installs them there with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
ls -la .whl
