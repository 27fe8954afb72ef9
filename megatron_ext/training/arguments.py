"""``finetune.py``'s flags (Megatron-LLM's names) parsed into a :class:`TrainConfig`."""

from __future__ import annotations

from megatron_ext.cli import FlagParser
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.models.families import family_names
from megatron_ext.parallel import ParallelArgs
from megatron_ext.training.config import (
    CheckpointArgs,
    DataArgs,
    OptimArgs,
    ScheduleArgs,
    TokenizerArgs,
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

  # several nodes: the same command on every node with torchrun's
  #   --nnodes N --node_rank R --master_addr HOST --master_port PORT

Every flag may also be spelled with - for _.
"""


def build_parser() -> FlagParser:
    parser = FlagParser(
        prog="finetune.py",
        description="Instruction finetuning of Llama-family models on megatron-core "
                    "(launch with torchrun; TP/PP/DP; gloo on CPU, NCCL on GPU).",
        epilog=EXAMPLE,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model_name", default="llama2", choices=family_names(),
                   help="model family: sets norm, activation, RoPE base, biases (default: %(default)s)")
    g.add_argument("--num_layers", type=int, default=2)
    g.add_argument("--hidden_size", type=int, default=64)
    g.add_argument("--num_attention_heads", type=int, default=4)
    g.add_argument("--num_attention_heads_kv", type=int, default=None,
                   help="key/value heads for grouped-query attention (default: all heads)")
    g.add_argument("--ffn_hidden_size", type=int, default=None,
                   help="MLP width (default: the family's rule)")
    g.add_argument("--seq_length", type=int, default=2048, help="longest sample in tokens")
    g.add_argument("--max_position_embeddings", type=int, default=None)
    g.add_argument("--rope_theta", type=float, default=None, help="RoPE base (default: family's)")
    g.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="Llama 3.1-style RoPE scaling with this factor (low/high frequency "
                        "factors 1/4, original context 8192); default: none")
    g.add_argument("--layernorm_epsilon", type=float, default=None)
    g.add_argument("--sliding_window_size", type=int, default=None,
                   help="attention window (Mistral; default: the family's)")
    g.add_argument("--init_method_std", type=float, default=0.02)
    g.add_argument("--make_vocab_size_divisible_by", type=int, default=128)

    g = parser.add_argument_group("parallelism and precision")
    g.add_argument("--tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    g.add_argument("--sequence_parallel", action="store_true")
    g.add_argument("--use_distributed_optimizer", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--use_flash_attn", action="store_true",
                   help="flash-attn kernels on CUDA when installed, else PyTorch SDPA")
    g.add_argument("--recompute_granularity", choices=["selective", "full"], default=None)

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", nargs="+", default=(),
                   help="preprocessed prefix, or weighted prefixes '0.7 a 0.3 b' (blended)")
    g.add_argument("--train_data_path", nargs="+", default=())
    g.add_argument("--valid_data_path", nargs="+", default=())
    g.add_argument("--test_data_path", nargs="+", default=())
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test proportions of --data_path (default: %(default)s)")
    g.add_argument("--data_type", default="instruction", choices=["instruction"])
    g.add_argument("--variable_seq_lengths", action="store_true",
                   help="pad each micro-batch to its longest sample (multiple of 16), "
                        "not to --seq_length")
    g.add_argument("--pack_sequences", action="store_true",
                   help="pack each micro-batch's samples into as few rows of at most "
                        "--seq_length tokens as fit (samples never attend to each other; "
                        "positions restart per sample); the loss is unchanged, padding shrinks")
    g.add_argument("--scalar_loss_mask", type=float, default=0.0,
                   help="loss weight of user and system tokens (assistant tokens: 1)")

    g = parser.add_argument_group("tokenizer (must match the data's meta.json)")
    g.add_argument("--tokenizer_type", default="SentencePieceTokenizer")
    g.add_argument("--vocab_file", default=None)
    g.add_argument("--vocab_extra_ids_list", default=None)
    g.add_argument("--no_new_tokens", action="store_false", dest="new_tokens")

    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--lr_decay_style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--lr_warmup_iters", type=int, default=0)
    g.add_argument("--lr_decay_iters", type=int, default=None)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--clip_grad", type=float, default=1.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_eps", type=float, default=1e-8)
    g.add_argument("--micro_batch_size", type=int, default=1)
    g.add_argument("--global_batch_size", type=int, default=1)
    g.add_argument("--train_iters", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None,
                   help="train for this many passes over the training split instead of --train_iters")
    g.add_argument("--seed", type=int, default=1234)

    g = parser.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log_interval", type=int, default=1)
    g.add_argument("--eval_interval", type=int, default=0, help="0: only at the end")
    g.add_argument("--eval_iters", type=int, default=10)
    g.add_argument("--save", default=None, help="checkpoint directory (also holds metrics.jsonl)")
    g.add_argument("--save_interval", type=int, default=0)
    g.add_argument("--load", default=None, help="resume from the latest checkpoint here")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take the weights only (fresh optimizer, iteration 0)")
    g.add_argument("--use_checkpoint_args", action="store_true",
                   help="take the model shape from the checkpoint in --load")
    g.add_argument("--tensorboard_dir", default=None)
    g.add_argument("--exit_interval", type=int, default=None,
                   help="stop (after saving) when the iteration is a multiple of this")
    g.add_argument("--exit_duration_in_mins", type=float, default=None,
                   help="stop (after saving) once this many minutes have passed")
    return parser


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        model=ModelArgs(
            model_name=args.model_name, num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_attention_heads_kv=args.num_attention_heads_kv,
            ffn_hidden_size=args.ffn_hidden_size, seq_length=args.seq_length,
            max_position_embeddings=args.max_position_embeddings, rope_theta=args.rope_theta,
            rope_scaling_factor=args.rope_scaling_factor,
            layernorm_epsilon=args.layernorm_epsilon, sliding_window_size=args.sliding_window_size,
            init_method_std=args.init_method_std,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by),
        parallel=ParallelArgs(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.sequence_parallel, args.use_distributed_optimizer),
        precision=PrecisionArgs(args.bf16, args.fp16, args.use_flash_attn,
                                args.recompute_granularity),
        data=DataArgs(tuple(args.data_path), tuple(args.train_data_path),
                      tuple(args.valid_data_path), tuple(args.test_data_path), args.split,
                      args.variable_seq_lengths, args.scalar_loss_mask, args.data_type,
                      args.pack_sequences),
        tokenizer=TokenizerArgs(args.tokenizer_type, args.vocab_file, args.vocab_extra_ids_list,
                                args.new_tokens),
        optim=OptimArgs(args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_iters,
                        args.lr_decay_iters, args.weight_decay, args.clip_grad, args.adam_beta1,
                        args.adam_beta2, args.adam_eps),
        schedule=ScheduleArgs(args.micro_batch_size, args.global_batch_size, args.train_iters,
                              args.epochs, args.seed, args.log_interval, args.eval_interval,
                              args.eval_iters, args.save_interval, args.exit_interval,
                              args.exit_duration_in_mins),
        checkpoint=CheckpointArgs(args.save, args.load, args.finetune, args.use_checkpoint_args,
                                  args.tensorboard_dir),
    )
