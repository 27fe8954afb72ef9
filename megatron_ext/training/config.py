"""Typed training configuration, built from Megatron-LLM's flags in one place.

Why: Megatron-LM keeps every setting in one global ``args`` namespace that
any function may read. Here ``finetune.py`` parses flags once into small
frozen dataclasses, checks them together (:meth:`TrainConfig.validate`), and
each function receives only the part it uses. Each field carries its flag's
help (``option``): the parser is derived from these fields (``arguments.py``),
so a default is written once. Importing this module costs no torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.cli import option
from megatron_ext.errors import ConfigError
from megatron_ext.models.config import (
    ModelArgs,
    MoEArgs,
    PrecisionArgs,
    family_setting_problems,
    moe_problems,
)
from megatron_ext.models.families import family_names
from megatron_ext.models.import_sources import import_source_kind
from megatron_ext.parallel import ModelShape, ParallelArgs
from megatron_ext.peft.config import PeftArgs
from megatron_ext.tokenizers import TokenizerArgs


@dataclass(frozen=True)
class DataArgs:
    data_path: tuple[str, ...] = option(
        (), "preprocessed prefix, or weighted prefixes '0.7 a 0.3 b' (blended)")
    train_data_path: tuple[str, ...] = option((), "training prefixes (instead of --data_path)")
    valid_data_path: tuple[str, ...] = option((), "validation prefixes (with --train_data_path)")
    test_data_path: tuple[str, ...] = option((), "test prefixes (with --train_data_path)")
    split: str = option("969,30,1", "train,valid,test proportions of --data_path")
    variable_seq_lengths: bool = option(False, "pad each micro-batch to its longest sample "
                                               "(multiple of 16, and of 2 x CP), not to "
                                               "--seq_length")
    scalar_loss_mask: float = option(0.0, "loss weight of user and system tokens "
                                          "(assistant tokens: 1)")
    data_type: str = option("instruction", "kind of the preprocessed data",
                            choices=("instruction",))
    pack_sequences: bool = option(
        False, "pack each epoch's records into rows of --seq_length tokens (best-fit "
               "decreasing: a few percent padding); a sample (of --micro_batch_size, "
               "--global_batch_size, --epochs' steps, consumed samples) is then a packed row "
               "of several records. Records never attend to each other, positions restart "
               "per record, the loss stays the mean over the global batch's answer tokens")
    pack_scope: str = option(
        "dataset", "with --pack_sequences: pack each epoch's records ('dataset': a sample "
                   "is a row), or only each micro-batch's ('micro_batch': a sample stays a "
                   "record, rows are as full as chance makes them)",
        choices=("dataset", "micro_batch"))

    @property
    def packed_rows(self) -> bool:
        """Whether a sample is a row of records packed across the dataset."""
        return self.pack_sequences and self.pack_scope == "dataset"


@dataclass(frozen=True)
class OptimArgs:
    lr: float = option(1e-5, "peak learning rate (Adam)")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = option("cosine", "learning-rate decay after the warmup",
                                 choices=("cosine", "linear", "constant"))
    lr_warmup_iters: int = option(0, "iterations of linear warmup from 0 to --lr")
    lr_decay_iters: Optional[int] = option(None, "iterations of warmup plus decay "
                                                 "(default: all training iterations)")
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW)")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    adam_beta1: float = option(0.9, "Adam's first-moment decay")
    adam_beta2: float = option(0.999, "Adam's second-moment decay")
    adam_eps: float = option(1e-8, "Adam's epsilon")
    # --fp16's loss scaling, as Megatron-LM names it (megatron-core's OptimizerConfig)
    loss_scale: Optional[float] = option(
        None, "--fp16: a static loss scale (a power of 2); default: dynamic loss scaling")
    initial_loss_scale: float = option(2.0 ** 32, "--fp16: the dynamic loss scale to start from")
    min_loss_scale: float = option(1.0, "--fp16: the dynamic loss scale's floor")
    loss_scale_window: int = option(1000, "--fp16: steps without inf/nan gradients before the "
                                          "dynamic loss scale doubles")
    hysteresis: int = option(2, "--fp16: steps with inf/nan gradients (each skipped) before the "
                                "dynamic loss scale halves")


@dataclass(frozen=True)
class ScheduleArgs:
    micro_batch_size: int = option(1, "samples per forward/backward pass on each rank")
    global_batch_size: int = option(1, "samples per optimizer step over all data-parallel "
                                       "ranks (gradient accumulation makes up the rest)")
    train_iters: Optional[int] = option(None, "optimizer steps to train for")
    epochs: Optional[float] = option(
        None, "train for this many passes over the training split instead of --train_iters")
    seed: int = option(1234, "random seed (initialisation, data order)")
    log_interval: int = option(1, "iterations between log lines")
    eval_interval: int = option(0, "iterations between evaluations; 0: only at the end")
    eval_iters: int = option(10, "validation batches per evaluation")
    save_interval: int = option(0, "iterations between checkpoints; 0: only at the end")
    exit_interval: Optional[int] = option(
        None, "stop (after saving) when the iteration is a multiple of this")
    exit_duration_in_mins: Optional[float] = option(
        None, "stop (after saving) once this many minutes have passed")
    wandb_project: Optional[str] = option(
        None, "also log the scalars to Weights & Biases, in this project (needs `pip install "
              "wandb`; WANDB_MODE=offline keeps the run on disk); a resumed run continues the "
              "same W&B run")
    wandb_exp_name: Optional[str] = option(None, "the W&B run's name (default: the --save "
                                                 "directory's name)")


@dataclass(frozen=True)
class CheckpointArgs:
    save: Optional[str] = option(None, "checkpoint directory (also holds metrics.jsonl)")
    load: Optional[str] = option(
        None, "resume from the latest checkpoint here; or start from a Hugging Face model "
              "directory (config.json + weights) or a .gguf file, imported once into "
              "--import_cache_dir (implies --finetune --use_checkpoint_args; the model's "
              "tokenizer unless --vocab_file)")
    finetune: bool = option(False, "with --load: take the weights only (fresh optimizer, "
                                   "iteration 0)")
    auto_resume: bool = option(
        False, "resume from the latest checkpoint in --save when there is one, else start "
               "from --load: the same command continues a stopped, relaunched or requeued "
               "run (NeMo's resume_if_exists)")
    use_checkpoint_args: bool = option(False, "take the model shape from the checkpoint in "
                                              "--load")
    import_cache_dir: Optional[str] = option(
        None, "where --load of a Hugging Face model or GGUF file is imported, keyed by the "
              "source's files and the import options, and reused while they are unchanged "
              "(default: SAVE/imported_models, without --save "
              "~/.cache/megatron-instruct/imports)")
    tensorboard_dir: Optional[str] = option(None, "also write TensorBoard event files here")

    @property
    def imports_model(self) -> bool:
        """--load names a model to import (a Hugging Face directory, a GGUF file), not a
        checkpoint: its shape and tokenizer come from the import."""
        return import_source_kind(self.load) is not None

    @property
    def shape_from_load(self) -> bool:
        """The model's shape is read from --load, not from the model flags."""
        return self.use_checkpoint_args or self.imports_model


BACKENDS = ("auto", "megatron", "hf")


@dataclass(frozen=True)
class BackendArgs:
    backend: str = option(
        "auto", "what trains the model: 'megatron' (megatron-core, a family of "
                "models/families; TP/PP/CP/EP), 'hf' (the Hugging Face model itself, any "
                "AutoModelForCausalLM of --load: FSDP2 data parallelism, its tp_plan), or "
                "'auto': megatron when a family claims --load's model, else hf",
        choices=BACKENDS)
    trust_remote_code: bool = option(
        False, "--backend hf: run the Python code a model directory ships (auto_map in its "
               "config.json); without it such a model is refused")
    compile: bool = option(False, "--backend hf: torch.compile each decoder layer (after "
                                  "sharding; the checkpoint's names are unchanged)")
    compile_backend: str = option("inductor", "--compile: torch.compile's backend (inductor "
                                              "needs a C++ compiler on CPU; aot_eager "
                                              "compiles nothing, for checks)")


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
    peft: PeftArgs = field(default_factory=PeftArgs)
    moe: MoEArgs = field(default_factory=MoEArgs)
    backend: BackendArgs = field(default_factory=BackendArgs)

    @property
    def hf_backend(self) -> bool:
        """The Hugging Face backend trains (``--backend hf``, or ``auto`` resolved to it by
        the run plan)."""
        return self.backend.backend == "hf"

    @property
    def shape_from_load(self) -> bool:
        """The model's shape is read from --load (a checkpoint, a model to import, or the
        base model of adapters), not from the model flags."""
        return self.checkpoint.shape_from_load or self.peft.enabled or self.hf_backend

    def validate(self, world_size: int, cuda: Optional[bool] = None, *,
                 model_shape: bool = True) -> None:
        """Every inconsistency, found before any work, in one message.

        Pure: imports nothing, so ``finetune.py`` refuses bad flags before torch and
        megatron-core are imported. ``cuda`` (whether CUDA is available) is accepted for
        device checks; none is needed today (bf16, fp16 and the distributed optimizer run
        on CPU too). ``model_shape=False``
        skips the checks of the model's shape, for ``--use_checkpoint_args`` before
        the checkpoint's shape is read.
        """
        problems = []
        m, p, s = self.model, self.parallel, self.schedule
        positive = {"--micro_batch_size": s.micro_batch_size,
                    "--global_batch_size": s.global_batch_size,
                    "--seq_length": m.seq_length,
                    "--train_iters": 1 if s.train_iters is None else s.train_iters,
                    "--epochs": 1 if s.epochs is None else s.epochs}
        if model_shape:
            positive = {"--num_layers": m.num_layers, "--hidden_size": m.hidden_size,
                        "--num_attention_heads": m.num_attention_heads,
                        "--num_attention_heads_kv": m.num_attention_heads_kv or 1,
                        "--make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
                        **positive}
        bad = [f"{flag} must be positive, got {value}" for flag, value in positive.items()
               if value <= 0]
        if bad:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(bad))
        tp = p.tensor_model_parallel_size
        if model_shape and m.model_name not in family_names():
            problems.append(f"--model_name {m.model_name!r} is not one of "
                            f"{', '.join(family_names())}")
        problems += p.problems(world_size, micro_batch_size=s.micro_batch_size,
                               global_batch_size=s.global_batch_size, seq_length=m.seq_length,
                               model=self._model_shape() if model_shape else None)
        if model_shape:
            problems += self._shape_problems()
        if (s.train_iters is None) == (s.epochs is None):
            problems.append("give exactly one of --train_iters and --epochs")
        if self.precision.bf16 and self.precision.fp16:
            problems.append("--bf16 and --fp16 are exclusive")
        o = self.optim
        if o.loss_scale is not None and o.loss_scale <= 0:
            problems.append(f"--loss_scale must be positive, got {o.loss_scale}")
        if not 0 < o.min_loss_scale <= o.initial_loss_scale:
            problems.append(f"--min_loss_scale {o.min_loss_scale} must be positive and at most "
                            f"--initial_loss_scale {o.initial_loss_scale}")
        if o.loss_scale_window < 1 or o.hysteresis < 1:
            problems.append("--loss_scale_window and --hysteresis must be at least 1")
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
        c = self.checkpoint
        if not self.tokenizer.vocab_file and not c.imports_model:
            problems.append("--vocab_file is required (the tokenizer the data was made with), "
                            "unless --load is a Hugging Face model or GGUF file (its own)")
        if c.imports_model and c.save and os.path.abspath(c.save) == os.path.abspath(c.load):
            problems.append(f"--save {c.save} is the model --load imports from; save elsewhere")
        if self.checkpoint.use_checkpoint_args and not self.checkpoint.load:
            problems.append("--use_checkpoint_args needs --load (the checkpoint to read)")
        if self.checkpoint.finetune and not self.checkpoint.load:
            problems.append("--finetune needs --load (the checkpoint to start from)")
        if s.save_interval and not self.checkpoint.save:
            problems.append("--save_interval needs --save")
        if c.auto_resume and not c.save:
            problems.append("--auto_resume needs --save (where it looks for a checkpoint)")
        if s.wandb_project and not (self.checkpoint.save or self.checkpoint.tensorboard_dir):
            problems.append("--wandb_project needs --save (the W&B run's files go there)")
        problems += self.peft.problems(max(tp, 1))
        problems += self._backend_problems()
        if self.peft.enabled and not c.load:
            problems.append(f"--peft {self.peft.peft} needs --load: the base model to adapt (a "
                            "checkpoint, a Hugging Face model directory or a .gguf file)")
        if problems:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))

    def _backend_problems(self) -> list[str]:
        """What the chosen backend cannot do (``auto`` is checked once the run plan has
        resolved it)."""
        b, p = self.backend, self.parallel
        if b.backend == "megatron":
            return [f"{flag} needs --backend hf (or auto with a model no family claims)"
                    for flag, given in (("--compile", b.compile),
                                        ("--trust_remote_code", b.trust_remote_code)) if given]
        if b.backend != "hf":
            return []
        problems = [f"--{name} {size}: the hf backend has no {what} (use --backend megatron "
                    "with a model a family claims, or 1)"
                    for name, size, what in (
                        ("pipeline_model_parallel_size", p.pipeline_model_parallel_size,
                         "pipeline parallelism"),
                        ("context_parallel_size", p.context_parallel_size,
                         "context parallelism"))
                    if size > 1]
        if self.precision.fp16:
            problems.append("--fp16: the hf backend trains in fp32 or --bf16 (no loss "
                            "scaling); use --bf16")
        if self.peft.enabled and p.tensor_model_parallel_size > 1:
            problems.append("--peft with --tensor_model_parallel_size > 1: the hf backend's "
                            "adapters train with FSDP2 only (TP 1)")
        if self.peft.enabled and self.peft.lora_A_init != "kaiming":
            problems.append("--lora_A_init: the hf backend draws A as peft does (kaiming)")
        if not self.checkpoint.load:
            problems.append("--backend hf needs --load: the Hugging Face model directory "
                            "(or .gguf file) to train, or its checkpoint")
        return problems

    def _model_shape(self) -> ModelShape:
        """What the parallel layout splits of the model (``ParallelArgs.problems``)."""
        m = self.model
        return ModelShape.of(m.num_layers, m.num_attention_heads, m.hidden_size,
                             m.num_attention_heads_kv, m.kv_channels,
                             m.experts if m.model_name in family_names() else m.num_experts)

    def _shape_problems(self) -> list[str]:
        """What of the model's shape is wrong whatever the layout."""
        m = self.model
        problems = family_setting_problems(m) + moe_problems(
            m, self.moe, self.parallel, self.data.variable_seq_lengths)
        if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
            problems.append(f"--hidden_size {m.hidden_size} is not divisible by "
                            f"--num_attention_heads {m.num_attention_heads}")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_model(self, model: ModelArgs) -> "TrainConfig":
        return dataclasses.replace(self, model=model)
