#!/usr/bin/env bash
# The fast path: the whole pipeline on the bundled sample (data/sample) with a tiny random
# model and a tokenizer trained on the spot, on CPU, in about two and a half minutes (scripts/demo.sh
# finetunes a real pretrained model instead):
#   1. train a small Llama-style SentencePiece tokenizer on the sample,
#   2. preprocess train/validation/test into megatron .bin/.idx token + role streams,
#   3. finetune a small Llama-2-style model with torchrun (2 processes, data parallel),
#      logging the falling loss and the validation loss and leaving a checkpoint,
#   4. evaluate it on the test split (answer loss, exact match, F1) and show one answer,
#   5. export it as a Hugging Face model directory that transformers loads.
# It installs what it needs (.venv) first. DEMO_DIR changes where outputs go.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
OUT=${DEMO_DIR:-runs/demo-tiny}
ITERS=${DEMO_ITERS:-150}
mkdir -p "$OUT/data"
echo "== 1/5 tokenizer: SentencePiece BPE trained on the sample ($OUT/tokenizer.model)"
$PY tools/train_tokenizer.py --input data/sample/training.jsonl --out "$OUT/tokenizer" --vocab_size 4000
for split in training validation test; do
  echo "== 2/5 preprocess $split (ChatML, 2 workers)"
  $PY instruct/preprocess_instruct_data.py \
    --input "data/sample/$split.jsonl" \
    --output_prefix "$OUT/data/$split" \
    --tokenizer_type SentencePieceTokenizer --vocab_file "$OUT/tokenizer.model" \
    --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \
    --question_key question --answer_key answer --system_key system \
    --chat_format chatml --max_seq_length 512 --overlong truncate \
    --workers 2 --no_progress
done
echo "== 3/5 finetune: torchrun, 2 processes (DP=2), $ITERS iterations; checkpoint in $OUT/checkpoints"
rm -rf "$OUT/checkpoints"
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 finetune.py \
  --train_data_path "$OUT/data/training" --valid_data_path "$OUT/data/validation" \
  --tokenizer_type SentencePieceTokenizer --vocab_file "$OUT/tokenizer.model" \
  --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \
  --model_name llama2 --num_layers 4 --hidden_size 128 --num_attention_heads 4 \
  --num_attention_heads_kv 2 --seq_length 512 --variable_seq_lengths \
  --micro_batch_size 4 --global_batch_size 16 --train_iters "$ITERS" \
  --lr 2e-3 --min_lr 2e-4 --lr_warmup_iters 10 --lr_decay_style cosine --weight_decay 0.01 \
  --log_interval 10 --eval_interval 50 --eval_iters 2 \
  --save "$OUT/checkpoints" --save_interval 100 --tensorboard_dir "$OUT/tensorboard"
echo "== 4/5 evaluate on the test split, then generate one answer"
$PY tools/evaluate.py --load "$OUT/checkpoints" --input data/sample/test.jsonl \
  --max_new_tokens 24 --output "$OUT/test_predictions.jsonl" --no_progress
$PY tools/generate.py --load "$OUT/checkpoints" --greedy --max_new_tokens 24 --no_progress \
  --prompt "When was the University of Louvain founded?"
echo "== 5/5 export to a Hugging Face directory ($OUT/hf) and load it with transformers"
$PY tools/megatron_to_hf.py --load "$OUT/checkpoints" --out "$OUT/hf" --dtype fp32 --overwrite \
  --no_progress
$PY -c "import sys, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); \
tok = t.AutoTokenizer.from_pretrained(sys.argv[1]); \
print('transformers loaded', type(m).__name__, 'with', m.num_parameters(), 'parameters;', \
'chat template:', repr(tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], \
tokenize=False, add_generation_prompt=True)))" "$OUT/hf"
echo "== done: data in $OUT/data, checkpoint in $OUT/checkpoints (metrics.jsonl there),"
echo "   test predictions in $OUT/test_predictions.jsonl, Hugging Face model in $OUT/hf,"
echo "   TensorBoard: tensorboard --logdir $OUT/tensorboard"
