#!/usr/bin/env python3
"""Convert a Hugging Face model directory or a GGUF file into a checkpoint to finetune.

Families: Llama 1/2/3/3.1/3.2, CodeLlama, Mistral, SmolLM2, Qwen2/2.5, Qwen3 (read
from config.json, or from the GGUF metadata). The output is an unsharded
checkpoint (safetensors in megatron-core names, the model shape in
run_config.json, the tokenizer files in tokenizer/) that finetune.py starts
from at any TP/PP. Tensors are converted one layer at a time (a GGUF's are
dequantized one at a time), so the model never has to fit in memory.
finetune.py --load HF_DIR (or a .gguf) runs this on the fly, into a cache.

examples:
  python tools/hf_to_megatron.py --model_path Llama-2-7b-hf --out ckpt/llama2-7b \\
      --vocab_extra_ids_list "<|im_start|>,<|im_end|>"
  torchrun --nproc_per_node 8 finetune.py --load ckpt/llama2-7b --finetune \\
      --use_checkpoint_args --tensor_model_parallel_size 4 --save runs/sft \\
      --tokenizer_type SentencePieceTokenizer --vocab_file ckpt/llama2-7b/tokenizer/tokenizer.model \\
      --no_megatron_llm_specials --vocab_extra_ids_list "<|im_start|>,<|im_end|>" ...
  python tools/hf_to_megatron.py --model_path SmolLM2-135M-Instruct.Q4_1.gguf --out ckpt/smollm2

The model keeps its tokenizer's ids. Tokens of --vocab_extra_ids_list that the
tokenizer lacks get embedding and output rows equal to the mean of the existing
rows; those it has keep their ids. A SentencePiece tokenizer.model gets none of
Megatron-LLM's <CLS> <SEP> <EOD> <MASK> <PAD>: preprocess its data with
--no_megatron_llm_specials.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.checkpointing.options import ImportConfig  # noqa: E402
from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.startup import heavy_imports  # noqa: E402


def build_parser() -> ConfigParser:
    """The flags of :class:`ImportConfig`; building it imports no torch."""
    parser = ConfigParser(prog="hf_to_megatron.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 2)[2])
    parser.add_config(ImportConfig)
    return parser


def main(argv=None) -> int:
    config = build_config(ImportConfig, build_parser().parse_args(argv))
    setup_logging()
    with heavy_imports("torch"):
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
