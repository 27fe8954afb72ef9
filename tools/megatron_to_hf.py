#!/usr/bin/env python3
"""Export a checkpoint (any TP/PP) as a Hugging Face model directory.

Reads what finetune.py saved (a dist_checkpointing run directory, at whatever
TP/PP it was trained with) or an unsharded checkpoint from hf_to_megatron.py or
checkpoint_util.py one layer at a time (a legacy Megatron-LLM per-rank
checkpoint is read whole: merge a large one first), and writes safetensors shards with an index, config.json,
generation_config.json (stopping at the chat format's end-of-turn token) and
the tokenizer with its added special tokens and a matching chat template.

examples:
  python tools/megatron_to_hf.py --load runs/sft/checkpoints --out runs/sft/hf --dtype bf16
  python -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('runs/sft/hf')"
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import FlagParser, parse_size, run_cli, setup_logging  # noqa: E402


def build_parser() -> FlagParser:
    parser = FlagParser(prog="megatron_to_hf.py", description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--load", required=True,
                        help="checkpoint: a run's --save directory, an unsharded checkpoint, "
                             "or a legacy Megatron-LLM checkpoint")
    parser.add_argument("--out", required=True, help="Hugging Face directory to create")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="weights dtype in the export (default: the precision the model "
                             "was trained in, else the dtype it was imported in, else fp32)")
    parser.add_argument("--iteration", type=int, default=None,
                        help="export this iteration instead of the latest")
    parser.add_argument("--chat_format", default=None,
                        help="chat template to write (chatml, megatron-llm, llama3, alpaca, or "
                             "none); default: the training data's, from its -meta.json, else "
                             "chatml when the tokenizer has its tokens")
    parser.add_argument("--prompt_template", default=None,
                        help="with --chat_format template: the preprocessing --prompt_template")
    parser.add_argument("--vocab_file", default=None,
                        help="tokenizer file, when the one named in the checkpoint has moved")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from megatron_ext.checkpointing.hf_export import ExportConfig, export_hf

    summary = export_hf(ExportConfig(
        load=args.load, out=args.out, dtype=args.dtype, iteration=args.iteration,
        chat_format=args.chat_format, prompt_template=args.prompt_template,
        vocab_file=args.vocab_file,
        max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
        progress=not args.no_progress))
    print(f"exported {args.load} ({summary.source}, iteration {summary.iteration}) -> "
          f"{summary.out}\n"
          f"  {summary.layers} layers, {summary.dtype}, "
          f"{summary.bytes / 2**20:.1f} MiB; vocabulary {summary.vocab_size} "
          f"(padding to {summary.padded_rows} removed)\n"
          f"  chat template: {summary.chat_format}; generation stops at token ids "
          f"{summary.eos_ids}\n"
          f"  took {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
