#!/usr/bin/env python3
"""Merge a checkpoint into one unsharded file set, or split one into a target TP/PP layout.

Reads a finetune.py run directory (dist_checkpointing, any TP/PP), an unsharded
checkpoint, or a legacy Megatron-LM/Megatron-LLM per-rank checkpoint
(iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt); the format is detected.

  merge   -> unsharded safetensors in megatron-core names (+ optimizer state and
             training position unless --no_optimizer), loadable by finetune.py
             at any TP/PP and by the other tools
  merge_lora -> a LoRA/DoRA adapter checkpoint (finetune.py --peft) folded into
             its base (any TP/PP): an unsharded plain model whose logits are the
             adapted model's (merge does the same for any adapter checkpoint)
  split   -> --format dist: a finetune.py run directory for --target_tp/--target_pp
             (vocabulary padding for that TP; resumes with optimizer state)
             --format legacy: Megatron-LLM per-rank files at that TP/PP
             (weights only, for Megatron-LLM's --finetune --no_load_optim)

Tensors are copied bit for bit; only vocabulary padding rows change.

examples:
  python tools/checkpoint_util.py merge --load runs/sft/checkpoints --out runs/sft/merged
  python tools/checkpoint_util.py split --load runs/sft/merged --out runs/sft/tp4 --target_tp 4
  python tools/checkpoint_util.py split --load runs/sft/checkpoints --out megatron_llm_ckpt \\
      --format legacy --target_tp 2 --target_pp 2
  python tools/checkpoint_util.py merge --load megatron_llm_ckpt --out from_legacy
  python tools/checkpoint_util.py merge_lora --load runs/lora/checkpoints --out runs/lora/merged
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.checkpointing.options import ReshardConfig  # noqa: E402
from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.startup import heavy_imports  # noqa: E402


def build_parser() -> ConfigParser:
    """The command (not a setting of :class:`ReshardConfig`: it picks the function) and the
    config's flags; building it imports no torch."""
    parser = ConfigParser(prog="checkpoint_util.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("command", choices=["merge", "merge_lora", "split"])
    parser.add_config(ReshardConfig)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(ReshardConfig, args)
    setup_logging()
    with heavy_imports("torch"):
        from megatron_ext.checkpointing.dcp import describe, hf_backend_checkpoint
        from megatron_ext.checkpointing.reshard import merge, split
    from megatron_ext.errors import CheckpointError

    native = hf_backend_checkpoint(config.load)
    if native is not None:
        raise CheckpointError(
            f"{describe(native)}; it needs no {args.command}: it reshards itself when a run "
            "resumes it at any data-parallel size, and tools/megatron_to_hf.py exports it "
            "(--adapter_only: its adapters)")

    if args.command == "merge_lora":
        from megatron_ext.checkpointing.adapters import adapter_run_config

        if adapter_run_config(config.load) is None:
            raise CheckpointError(f"merge_lora: {config.load} is not an adapter checkpoint (the "
                                  "--save directory of a finetune.py --peft run); use merge")
    if args.command in ("merge", "merge_lora"):
        s = merge(config)
        print(f"merged {config.load} ({s.source}, iteration {s.iteration}) -> {s.out}: "
              f"{s.tensors} tensors, {s.bytes / 2**20:.1f} MiB, optimizer state "
              f"{'included' if s.optimizer else 'not included'} ({s.seconds:.1f} s)")
    else:
        s = split(config)
        print(f"split {config.load} ({s.source}, iteration {s.iteration}) -> {s.out}: "
              f"{s.format} at TP={s.tp} PP={s.pp}, {s.tensors} tensors, "
              f"vocabulary rows {s.vocab_rows}, optimizer state "
              f"{'included' if s.optimizer else 'not included'} ({s.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
