#!/usr/bin/env bash
# End-to-end demo on the bundled sample (data/sample): installs what it needs,
# trains a small Llama-style tokenizer, preprocesses train/validation/test into
# megatron .bin/.idx token and role streams, and prints the summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT/data"
echo "== 1/2 tokenizer: SentencePiece BPE trained on the sample ($OUT/tokenizer.model)"
$PY tools/train_tokenizer.py --input data/sample/training.jsonl --out "$OUT/tokenizer" --vocab_size 4000
for split in training validation test; do
  echo "== 2/2 preprocess $split (ChatML, 2 workers)"
  $PY instruct/preprocess_instruct_data.py \
    --input "data/sample/$split.jsonl" \
    --output_prefix "$OUT/data/$split" \
    --tokenizer_type SentencePieceTokenizer --vocab_file "$OUT/tokenizer.model" \
    --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \
    --question_key question --answer_key answer --system_key system \
    --chat_format chatml --max_seq_length 2048 --overlong truncate \
    --workers 2 --no_progress
done
echo "== done: $OUT/data/{training,validation,test}-{text,role}.{bin,idx} and -meta.json"
