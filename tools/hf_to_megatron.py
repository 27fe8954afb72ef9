#!/usr/bin/env python3
"""Convert a Hugging Face Llama 1/2/3, CodeLlama or Mistral model into a checkpoint to finetune.

The output is an unsharded checkpoint (safetensors in megatron-core names, the
model shape in run_config.json, the tokenizer files in tokenizer/) that
finetune.py starts from at any TP/PP. Tensors are converted one layer at a
time, so the model never has to fit in memory.

examples:
  python tools/hf_to_megatron.py --model_path Llama-2-7b-hf --out ckpt/llama2-7b \\
      --vocab_extra_ids_list "<|im_start|>,<|im_end|>"
  torchrun --nproc_per_node 8 finetune.py --load ckpt/llama2-7b --finetune \\
      --use_checkpoint_args --tensor_model_parallel_size 4 --save runs/sft \\
      --tokenizer_type SentencePieceTokenizer --vocab_file ckpt/llama2-7b/tokenizer/tokenizer.model \\
      --vocab_extra_ids_list "<|im_start|>,<|im_end|>" ...

New tokens from --vocab_extra_ids_list get embedding and output rows equal to
the mean of the existing rows. The family (--model_name) is read from
config.json when not given.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import FlagParser, parse_size, run_cli, setup_logging  # noqa: E402
from megatron_ext.models.families import hf_family_names  # noqa: E402


def build_parser() -> FlagParser:
    parser = FlagParser(prog="hf_to_megatron.py", description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model_path", required=True,
                        help="Hugging Face model directory (config.json, *.safetensors or "
                             "*.bin, tokenizer files)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--model_name", default=None,
                        choices=hf_family_names(),
                        help="model family (default: detected from config.json)")
    parser.add_argument("--vocab_extra_ids_list", default=None,
                        help="comma-separated special tokens to add, e.g. "
                             "'<|im_start|>,<|im_end|>' (same value as for preprocessing)")
    parser.add_argument("--tokenizer_type", default=None,
                        help="SentencePieceTokenizer or HFTokenizer (default: tokenizer.model "
                             "if the directory has one, else tokenizer.json)")
    parser.add_argument("--vocab_file", default=None,
                        help="tokenizer to use instead of the model directory's own")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="store weights in this dtype (default: as in the checkpoint)")
    parser.add_argument("--max_shard_size", default="2GB",
                        help="largest output file (default 2GB); memory use is about one "
                             "layer plus one shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf

    summary = import_hf(ImportConfig(
        model_path=args.model_path, out=args.out, model_name=args.model_name,
        vocab_extra_ids_list=args.vocab_extra_ids_list, tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file, dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
        progress=not args.no_progress))
    print(f"converted {args.model_path} ({summary.weights_format}) -> {summary.out}\n"
          f"  family {summary.family}, {summary.layers} layers, {summary.dtype}, "
          f"{summary.bytes / 2**20:.1f} MiB\n"
          f"  vocabulary: {summary.hf_vocab_rows} rows in the model, tokenizer "
          f"{summary.vocab_size} ({summary.new_token_rows} new rows initialised to the "
          f"mean embedding)\n"
          f"  tokenizer files: {', '.join(summary.tokenizer_files) or 'none'}\n"
          f"  took {summary.seconds:.1f} s; start training with --load {summary.out} "
          "--finetune --use_checkpoint_args")
    return 0


if __name__ == "__main__":
    run_cli(main)
