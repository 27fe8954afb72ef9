"""``finetune.py``'s flags (Megatron-LLM's names), derived from the config dataclasses.

Why derived: each flag's default, type and help live once, on its field in
``training/config.py``; the parser is built from the fields and the
:class:`TrainConfig` is built back by keyword. Nothing here imports torch or
megatron-core, so ``--help`` and every argument error come back at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

from megatron_ext.cli import FLAG, ConfigParser, build_config
from megatron_ext.tokenizers import SENTENCEPIECE, TokenizerArgs
from megatron_ext.training.config import (
    BackendArgs,
    CheckpointArgs,
    DataArgs,
    ModelArgs,
    MoEArgs,
    OptimArgs,
    ParallelArgs,
    PeftArgs,
    PrecisionArgs,
    ScheduleArgs,
    TrainConfig,
)

EXAMPLE = """examples:
  # 2 processes on one node, tensor parallel 2, from preprocessed data
  torchrun --nproc_per_node 2 finetune.py --tensor_model_parallel_size 2 \\
      --data_path runs/data/train --split 98,2,0 --model_name llama2 \\
      --tokenizer_type SentencePieceTokenizer --vocab_file tokenizer.model \\
      --vocab_extra_ids_list "<|im_start|>,<|im_end|>" --num_layers 4 --hidden_size 256 \\
      --num_attention_heads 8 --seq_length 1024 --variable_seq_lengths \\
      --micro_batch_size 2 --global_batch_size 16 --train_iters 200 --lr 3e-4 \\
      --save runs/ckpt --save_interval 50

  # start from a Hugging Face model directory (or a .gguf file): imported once into a
  # cache (--import_cache_dir), its shape and tokenizer used; no conversion step
  torchrun --nproc_per_node 8 finetune.py --load Llama-2-7b-hf --save runs/sft \\
      --tensor_model_parallel_size 4 --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \\
      --data_path runs/data/train --seq_length 2048 --micro_batch_size 1 \\
      --global_batch_size 64 --epochs 3 --lr 2e-5

  # several nodes: the same command on every node with torchrun's
  #   --nnodes N --node_rank R --master_addr HOST --master_port PORT

Every flag may also be spelled with - for _.
"""

# (config, help section), in the order --help shows them
SECTIONS = (
    (ModelArgs, "model"),
    (ParallelArgs, "parallelism"),
    (PrecisionArgs, "precision and memory"),
    (DataArgs, "data"),
    (TokenizerArgs, "tokenizer (must match the data's meta.json)"),
    (OptimArgs, "optimizer"),
    (ScheduleArgs, "batches, schedule, logging and evaluation"),
    (CheckpointArgs, "checkpoints"),
    (PeftArgs, "parameter-efficient finetuning (LoRA, DoRA)"),
    (MoEArgs, "mixture of experts (with --num_experts)"),
    (BackendArgs, "training backend"),
)


def _tokenizer_type_flag() -> dict:
    """finetune.py's --tokenizer_type: None until resolved, so that "not given" lets --load
    of a Hugging Face model use the model's own tokenizer."""
    flag = next(f for f in dataclasses.fields(TokenizerArgs)
                if f.name == "tokenizer_type").metadata[FLAG]
    return {"tokenizer_type": {"default": None, "help": (
        f"{flag.help}; default {SENTENCEPIECE}, or with --load of a Hugging Face model and no "
        "--vocab_file, the model's own (tokenizer.model, else tokenizer.json)")}}


def build_parser() -> ConfigParser:
    parser = ConfigParser(
        prog="finetune.py",
        description="Instruction finetuning of Llama-family models on megatron-core "
                    "(launch with torchrun; TP/PP/DP; gloo on CPU, NCCL on GPU).",
        epilog=EXAMPLE,
    )
    for config, title in SECTIONS:
        parser.add_config(config, title,
                          _tokenizer_type_flag() if config is TokenizerArgs else None)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The typed config; a --tokenizer_type not given is the default, except where the
    trainer takes it from the model that --load imports (no --vocab_file)."""
    config = build_config(TrainConfig, args)
    tokenizer = config.tokenizer
    if tokenizer.tokenizer_type is None and (tokenizer.vocab_file
                                             or not config.checkpoint.imports_model):
        config = dataclasses.replace(config, tokenizer=dataclasses.replace(
            tokenizer, tokenizer_type=SENTENCEPIECE))
    return config


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The command line as a checked :class:`TrainConfig`, without importing torch.

    Every check that needs no device runs here (the model's shape only when it does
    not come from --load: ``--use_checkpoint_args``, or a model to import); the trainer repeats
    them with the device checks once torch is imported.
    """
    config = config_from_args(build_parser().parse_args(argv))
    config.validate(int(os.environ.get("WORLD_SIZE", "1")),
                    model_shape=not config.shape_from_load)
    return config
