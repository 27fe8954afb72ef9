"""Typed training configuration, built from Megatron-LLM's flags in one place.

Why: Megatron-LM keeps every setting in one global ``args`` namespace that
any function may read. Here ``finetune.py`` parses flags once into small
frozen dataclasses, checks them together (:meth:`TrainConfig.validate`), and
each function receives only the part it uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.errors import ConfigError
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.models.families import family_names
from megatron_ext.parallel import ParallelArgs


@dataclass(frozen=True)
class DataArgs:
    data_path: tuple[str, ...] = ()  # prefix, or weight prefix weight prefix ...
    train_data_path: tuple[str, ...] = ()
    valid_data_path: tuple[str, ...] = ()
    test_data_path: tuple[str, ...] = ()
    split: str = "969,30,1"
    variable_seq_lengths: bool = False
    scalar_loss_mask: float = 0.0
    data_type: str = "instruction"
    pack_sequences: bool = False


@dataclass(frozen=True)
class TokenizerArgs:
    tokenizer_type: str = "SentencePieceTokenizer"
    vocab_file: Optional[str] = None
    vocab_extra_ids_list: Optional[str] = None
    new_tokens: bool = True


@dataclass(frozen=True)
class OptimArgs:
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleArgs:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: Optional[int] = None
    epochs: Optional[float] = None
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0
    eval_iters: int = 10
    save_interval: int = 0
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None


@dataclass(frozen=True)
class CheckpointArgs:
    save: Optional[str] = None
    load: Optional[str] = None
    finetune: bool = False
    use_checkpoint_args: bool = False
    tensorboard_dir: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    precision: PrecisionArgs = field(default_factory=PrecisionArgs)
    data: DataArgs = field(default_factory=DataArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)

    def validate(self, world_size: int, cuda: Optional[bool] = None) -> None:
        """Every inconsistency, found before any work, in one message."""
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        problems = []
        m, p, s = self.model, self.parallel, self.schedule
        positive = {"--num_layers": m.num_layers, "--hidden_size": m.hidden_size,
                    "--num_attention_heads": m.num_attention_heads,
                    "--num_attention_heads_kv": m.num_attention_heads_kv or 1,
                    "--seq_length": m.seq_length,
                    "--make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
                    "--micro_batch_size": s.micro_batch_size,
                    "--global_batch_size": s.global_batch_size,
                    "--train_iters": 1 if s.train_iters is None else s.train_iters,
                    "--epochs": 1 if s.epochs is None else s.epochs}
        bad = [f"{flag} must be positive, got {value}" for flag, value in positive.items()
               if value <= 0]
        if bad:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(bad))
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if m.model_name not in family_names():
            problems.append(f"--model_name {m.model_name!r} is not one of "
                            f"{', '.join(family_names())}")
        if tp < 1 or pp < 1:
            problems.append("--tensor_model_parallel_size and --pipeline_model_parallel_size must be >= 1")
        elif world_size % (tp * pp):
            problems.append(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
        dp = max(1, world_size // max(1, tp * pp))
        if m.num_attention_heads % tp:
            problems.append(f"--num_attention_heads {m.num_attention_heads} is not divisible by "
                            f"--tensor_model_parallel_size {tp}")
        kv = m.num_attention_heads_kv or m.num_attention_heads
        if m.num_attention_heads % kv:
            problems.append(f"--num_attention_heads {m.num_attention_heads} is not divisible by "
                            f"--num_attention_heads_kv {kv}")
        if kv % tp:
            problems.append(f"--num_attention_heads_kv {kv} is not divisible by "
                            f"--tensor_model_parallel_size {tp}")
        if m.hidden_size % m.num_attention_heads:
            problems.append(f"--hidden_size {m.hidden_size} is not divisible by "
                            f"--num_attention_heads {m.num_attention_heads}")
        if m.num_layers % pp:
            problems.append(f"--num_layers {m.num_layers} is not divisible by "
                            f"--pipeline_model_parallel_size {pp}")
        if s.global_batch_size % (s.micro_batch_size * dp):
            problems.append(f"--global_batch_size {s.global_batch_size} is not divisible by "
                            f"--micro_batch_size {s.micro_batch_size} x data parallel size {dp}")
        if (s.train_iters is None) == (s.epochs is None):
            problems.append("give exactly one of --train_iters and --epochs")
        if self.precision.bf16 and self.precision.fp16:
            problems.append("--bf16 and --fp16 are exclusive")
        if p.sequence_parallel and tp == 1:
            problems.append("--sequence_parallel splits the sequence over tensor-parallel ranks: "
                            "it needs --tensor_model_parallel_size > 1")
        if p.sequence_parallel and not self.data.variable_seq_lengths and m.seq_length % tp:
            problems.append(f"--sequence_parallel: --seq_length {m.seq_length} must be divisible "
                            f"by --tensor_model_parallel_size {tp}")
        if p.sequence_parallel and self.data.variable_seq_lengths and 16 % tp:
            problems.append("--sequence_parallel with --variable_seq_lengths pads widths to a "
                            f"multiple of 16, which TP {tp} does not divide")
        if (self.precision.bf16 or self.precision.fp16) and not cuda:
            problems.append("--bf16/--fp16 need CUDA (megatron-core's mixed-precision optimizer "
                            "wraps CUDA tensors only); on CPU train in fp32")
        if p.use_distributed_optimizer and not cuda:
            problems.append("--use_distributed_optimizer needs CUDA (megatron-core's distributed "
                            "optimizer checks for CUDA tensors); drop it on CPU")
        if self.optim.lr_decay_style not in ("cosine", "linear", "constant"):
            problems.append(f"--lr_decay_style {self.optim.lr_decay_style!r}: use cosine, linear "
                            "or constant")
        if self.precision.recompute_granularity not in (None, "selective", "full"):
            problems.append("--recompute_granularity must be selective or full")
        d = self.data
        if not d.data_path and not d.train_data_path:
            problems.append("give --data_path (with --split) or --train_data_path")
        if d.data_path and d.train_data_path:
            problems.append("give either --data_path or --train_data_path, not both")
        if self.data.data_type != "instruction":
            problems.append("--data_type: only 'instruction' is supported")
        if not self.tokenizer.vocab_file:
            problems.append("--vocab_file is required (the tokenizer the data was made with)")
        if self.checkpoint.use_checkpoint_args and not self.checkpoint.load:
            problems.append("--use_checkpoint_args needs --load (the checkpoint to read)")
        if self.checkpoint.finetune and not self.checkpoint.load:
            problems.append("--finetune needs --load (the checkpoint to start from)")
        if s.save_interval and not self.checkpoint.save:
            problems.append("--save_interval needs --save")
        if problems:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_model(self, model: ModelArgs) -> "TrainConfig":
        return dataclasses.replace(self, model=model)
