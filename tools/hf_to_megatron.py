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

from megatron_ext.checkpointing.options import ImportConfig  # noqa: E402
from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402


def build_parser() -> ConfigParser:
    """The flags of :class:`ImportConfig`; building it imports no torch."""
    parser = ConfigParser(prog="hf_to_megatron.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 2)[2])
    parser.add_config(ImportConfig)
    return parser


def main(argv=None) -> int:
    config = build_config(ImportConfig, build_parser().parse_args(argv))
    setup_logging()
    from megatron_ext.checkpointing.hf_import import import_hf

    summary = import_hf(config)
    print(f"converted {config.model_path} ({summary.weights_format}) -> {summary.out}\n"
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
