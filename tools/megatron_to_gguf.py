#!/usr/bin/env python3
"""Export a checkpoint (any TP/PP) as one GGUF file for llama.cpp, Ollama and LM Studio.

Reads what finetune.py saved (a dist_checkpointing run directory), an unsharded
checkpoint (hf_to_megatron.py, checkpoint_util.py) or a legacy Megatron-LLM one, a
LoRA/DoRA adapter checkpoint folded into its base; writes llama.cpp's architecture,
metadata, tensor names and row orders, the tokenizer (BPE merges or SentencePiece
scores, special ids, add_bos) and the chat template, tensors streamed one at a time
and the file renamed into place only when complete.

examples:
  python tools/megatron_to_gguf.py --load runs/sft/checkpoints --out sft.gguf --outtype q8_0
  llama-cli -m sft.gguf -cnv
  echo 'FROM ./sft.gguf' > Modelfile && ollama create sft -f Modelfile && ollama run sft
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.checkpointing.options import GGUFExportConfig  # noqa: E402
from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.startup import heavy_imports  # noqa: E402


def build_parser() -> ConfigParser:
    """The flags of :class:`GGUFExportConfig`; building it imports no torch."""
    parser = ConfigParser(prog="megatron_to_gguf.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 2)[2])
    parser.add_config(GGUFExportConfig)
    return parser


def main(argv=None) -> int:
    config = build_config(GGUFExportConfig, build_parser().parse_args(argv))
    setup_logging()
    with heavy_imports("torch"):
        from megatron_ext.checkpointing.gguf_export import export_gguf

    s = export_gguf(config)
    types = ", ".join(f"{count} {kind}" for kind, count in s.types.items())
    print(f"exported {config.load} ({s.source}, iteration {s.iteration}) -> {s.out}\n"
          f"  llama.cpp architecture {s.architecture}, {s.layers} layers, {s.outtype} "
          f"({s.tensors} tensors: {types}), {s.bytes / 2**20:.1f} MiB\n"
          f"  tokenizer: {s.tokenizer_model} (pre-tokenizer {s.pre_tokenizer or 'default'}), "
          f"{s.vocab_size} tokens, add_bos {str(s.add_bos).lower()}; chat template: "
          f"{s.chat_format}; stops at token ids {s.eos_ids}\n"
          "  run it with:\n" + "".join(f"    {line}\n" for line in s.run_lines())
          + f"  took {s.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
