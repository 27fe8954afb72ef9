#!/usr/bin/env python3
"""Export a checkpoint (any TP/PP) as a Hugging Face model directory.

Reads what finetune.py saved (a dist_checkpointing run directory, at whatever
TP/PP it was trained with) or an unsharded checkpoint from hf_to_megatron.py or
checkpoint_util.py one layer at a time (a legacy Megatron-LLM per-rank
checkpoint is read whole: merge a large one first), and writes safetensors shards with an index, config.json,
generation_config.json (stopping at the chat format's end-of-turn token) and
the tokenizer with its added special tokens and a matching chat template.

A LoRA/DoRA run's checkpoint (finetune.py --peft) exports its base model with
the adapters merged in, or with --adapter_only the adapters alone in the
Hugging Face PEFT layout.

examples:
  python tools/megatron_to_hf.py --load runs/sft/checkpoints --out runs/sft/hf --dtype bf16
  python tools/megatron_to_hf.py --load runs/lora/checkpoints --out runs/lora/adapter --adapter_only
  python -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('runs/sft/hf')"
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.checkpointing.options import ExportConfig  # noqa: E402
from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.startup import heavy_imports  # noqa: E402


def build_parser() -> ConfigParser:
    """The flags of :class:`ExportConfig`; building it imports no torch."""
    parser = ConfigParser(prog="megatron_to_hf.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 2)[2])
    parser.add_config(ExportConfig)
    return parser


def main(argv=None) -> int:
    config = build_config(ExportConfig, build_parser().parse_args(argv))
    setup_logging()
    with heavy_imports("torch"):
        from megatron_ext.checkpointing.dcp import hf_backend_checkpoint

    if config.adapter_only and hf_backend_checkpoint(config.load):
        from megatron_ext.checkpointing.hf_export import export_hf_backend_adapter

        directory = export_hf_backend_adapter(config)
        print(f"exported the adapters of {directory} (hf backend) -> {config.out} (peft's "
              "own layout: PeftModel.from_pretrained(base, out))")
        return 0
    if config.adapter_only:
        from megatron_ext.checkpointing.hf_peft import export_adapter

        s = export_adapter(config.load, config.out, config.iteration, config.base,
                           config.overwrite)
        print(f"exported the {s.method} adapters of {config.load} (iteration {s.iteration}, "
              f"rank {s.rank}) -> {s.out}\n  {s.tensors} tensors for "
              f"{', '.join(s.target_modules)}\n  base model: {s.base_model} ({s.base_origin})"
              f"\n  load with:\n" + "".join(f"    {line}\n" for line in s.load_lines())
              + f"  took {s.seconds:.1f} s")
        return 0
    from megatron_ext.checkpointing.hf_export import HF_BACKEND, export_hf

    summary = export_hf(config)
    print(f"exported {config.load} ({summary.source}, iteration {summary.iteration}) -> "
          f"{summary.out}\n"
          f"  {summary.layers} layers, {summary.dtype}, "
          f"{summary.bytes / 2**20:.1f} MiB; vocabulary {summary.vocab_size} "
          + (f"({summary.padded_rows} embedding rows kept)\n" if summary.source == HF_BACKEND
             else f"(padding to {summary.padded_rows} removed)\n") +
          f"  chat template: {summary.chat_format}; generation stops at token ids "
          f"{summary.eos_ids}\n"
          f"  took {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
