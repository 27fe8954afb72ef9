"""The launcher's settings (``instruct/sft.py``), with NeMo's recipe flags; no torch.

Why one dataclass with the recipes' names: users come from NeMo's
``finetune_llm.py --executor local|slurm --experiment NAME ...`` and Meditron's
``sft.py``; the launcher takes their flags (and short forms) and derives the
trainer's configuration from them (``recipe.trainer_config``). Settings are split
into what *defines* an experiment (:meth:`SFTConfig.identity`: base model, data,
format, schedule, adapters; a rerun must not change them) and how it runs this
time (executor, nodes, parallel layout, cluster account): a rerun may change
those, since checkpoints load at any layout.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.checkpointing.options import GGUF_OUTTYPES
from megatron_ext.cli import flag_name, option
from megatron_ext.errors import ConfigError
from megatron_ext.launch.executors import executor_names
from megatron_ext.parallel import ParallelArgs
from megatron_ext.peft.config import PeftArgs
from megatron_ext.training.config import BACKENDS

EXECUTORS = executor_names()  # the files of launch/executors/
GLOBAL_BATCH = 32  # the global batch when neither it nor the accumulation steps are given
# fields that say how this launch runs, not what the experiment is
RUNTIME_FIELDS = frozenset({
    "executor", "num_nodes", "num_gpus", "parallel", "micro_batch_size", "account",
    "partition", "container_image", "container_mounts", "time", "dry_run", "restart", "wait",
    "wandb_project", "node_rank", "master_addr", "master_port", "experiments_dir",
    "save_interval", "bf16", "progress", "cpu", "cpus_per_task", "rdzv_port", "baseline",
    "export", "export_gguf", "max_rejected_fraction",
    "gradient_accumulation_steps"})  # layout-dependent: the global batch it gives is kept
EXPORTS = ("merged", "adapter", "both")


@dataclass(frozen=True)
class SFTConfig:
    experiment: str = option(help="experiment name: its folder EXPERIMENTS_DIR/NAME holds the "
                                  "data cache key, checkpoints, logs, evaluation and export; "
                                  "the same command again resumes it",
                             names=("--experiment", "-E"))
    dataset_path: str = option(help="folder with training.jsonl (validation.jsonl and "
                                    "test.jsonl optional), or with preprocessed "
                                    "training/validation/test .bin/.idx splits")
    hf_model_id: Optional[str] = option(
        None, "base model: a Hugging Face model directory, a .gguf file, or a hub id found in "
              "the local Hugging Face cache (never downloaded)",
        aliases=("--model", "--model_name_or_path"))
    load: Optional[str] = option(None, "base model: a checkpoint of this project (any form) "
                                       "instead of --hf_model_id")
    experiments_dir: str = option("experiments", "where experiment folders live")
    executor: str = option("local", "where to run: local (torchrun here) or slurm (sbatch)",
                           choices=EXECUTORS)
    backend: str = option(
        "auto", "what trains the base model: megatron (imported into megatron-core: a family "
                "of models/families claims it), hf (the Hugging Face model itself, not "
                "imported, also for a model a family claims: how the two are compared), or "
                "auto: megatron when a family claims it, else hf", choices=BACKENDS)
    # -- data
    chat_format: Optional[str] = option(
        None, "chat format of the records (hf, chatml, llama3, megatron-llm, alpaca, "
              "template); default: the model's own template when its tokenizer has one, "
              "else chatml")
    prompt_template: Optional[str] = option(None, "with --chat_format template: the template")
    question_key: Optional[str] = option(
        None, "key of the user question (default: the record format is detected from the "
              "first records: question/answer, NeMo's input/output, Alpaca's "
              "instruction/input/output, OpenAI messages or ShareGPT conversations)")
    answer_key: Optional[str] = option(None, "key of the answer, the training target "
                                             "(default: detected)")
    system_key: Optional[str] = option(None, "key of an optional system prompt (default: "
                                             "detected; 'system')")
    messages_key: Optional[str] = option(
        None, "key of multi-turn messages (replaces question/answer keys)")
    max_rejected_fraction: float = option(
        0.01, "stop before training when more than this fraction of a split's records is "
              "rejected (the first ones are printed, all of them written to "
              "EXPERIMENTS_DIR/NAME/rejected/)")
    vocab_extra_ids_list: Optional[str] = option(
        None, "special tokens to add to the model's tokenizer, e.g. '<|im_start|>,<|im_end|>' "
              "(tokens it already has keep their ids); those the chat format needs are added "
              "without it")
    seq_length: int = option(2048, "row length in tokens: each epoch's records are packed "
                                   "into rows of this length (longer records truncated); a "
                                   "row is one sample of the batches")
    # -- schedule
    max_steps: Optional[int] = option(None, "optimizer steps (default: --epochs passes)")
    epochs: Optional[float] = option(
        None, "passes over the training split (default 1 without --max_steps): the steps "
              "are computed from the rows the tokenized records pack into and the global "
              "batch, once",
        aliases=("--num_train_epochs",))
    global_batch_size: Optional[int] = option(
        None, f"samples (packed rows) per optimizer step (default {GLOBAL_BATCH}, or with "
              "--gradient_accumulation_steps: --micro_batch_size x those steps x the "
              "data-parallel size)", names=("--global_batch_size", "-g"))
    micro_batch_size: int = option(1, "samples per forward pass on each data-parallel rank",
                                   names=("--micro_batch_size", "-m"),
                                   aliases=("--per_device_train_batch_size",))
    gradient_accumulation_steps: Optional[int] = option(
        None, "TRL's way to give the global batch: micro-batches per optimizer step on each "
              "data-parallel rank, so --global_batch_size = --micro_batch_size x this x the "
              "data-parallel size (--num_nodes x --num_gpus / (TP x PP x CP))")
    lr: Optional[float] = option(None, "peak learning rate (default 1e-4 with --peft, else "
                                       "1e-5)", aliases=("--learning_rate",))
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(0, "steps of linear warmup", aliases=("--lr_warmup_iters",))
    weight_decay: float = option(0.0, "decoupled weight decay")
    seed: int = option(1234, "random seed")
    save_interval: int = option(50, "steps between checkpoints (a SIGTERM also saves)")
    # -- parallelism and machines
    num_nodes: int = option(1, "nodes", names=("--num_nodes", "-N"))
    num_gpus: int = option(1, "processes per node (GPUs per node; CPU processes without a GPU)",
                           names=("--num_gpus", "-G"), aliases=("--devices",))
    bf16: bool = option(False, "train in bfloat16 (CUDA)")
    node_rank: int = option(0, "local executor on several nodes: this node's rank")
    master_addr: str = option("127.0.0.1", "local executor on several nodes: the first node")
    master_port: int = option(29500, "local executor on several nodes: its rendezvous port")
    # -- Slurm
    account: Optional[str] = option(None, "Slurm account", names=("--account", "-a"))
    partition: Optional[str] = option(None, "Slurm partition", names=("--partition", "-p"))
    time: Optional[str] = option(None, "Slurm time limit (e.g. 04:00:00); the job saves a "
                                       "checkpoint before it")
    container_image: Optional[str] = option(None, "Slurm: run in this container (pyxis)",
                                            names=("--container_image", "-i"))
    container_mounts: tuple[str, ...] = option((), "Slurm: container mounts SRC:DST")
    wait: bool = option(False, "Slurm: follow the job until it ends")
    cpu: bool = option(False, "Slurm: CPU nodes (request no GPUs; --num_gpus processes each)")
    cpus_per_task: Optional[int] = option(
        None, "Slurm: CPUs of a node's task (its torchrun and workers); clusters that pin "
              "tasks to CPUs need it")
    rdzv_port: int = option(29500, "Slurm: the rendezvous port on the job's first node")
    # -- the launch itself
    dry_run: bool = option(False, "print the plan (data, model, layout, steps, commands) and "
                                  "exit")
    restart: bool = option(False, "start the experiment over: its folder is moved aside")
    wandb_project: Optional[str] = option(None, "also log to Weights & Biases (if installed)")
    progress: bool = option(True, "no progress bars")
    # -- after training
    baseline: bool = option(True, "do not evaluate the pretrained base model on the test split "
                                  "(the summary's baseline column; evaluated once per "
                                  "experiment)")
    eval_max_new_tokens: int = option(
        64, "longest answer generated for each test record when evaluating the pretrained "
            "and the finetuned model (exact match and token F1 compare it with the reference)")
    export: str = option("both", "what to export with --peft: the Hugging Face model with the "
                                 "adapters merged, the PEFT adapter, or both (full finetuning: "
                                 "merged)", choices=EXPORTS)
    export_gguf: Optional[str] = option(
        None, "also export the finetuned model (adapters merged) as one GGUF file of this "
              "tensor type for llama.cpp, Ollama and LM Studio, gguf/model-TYPE.gguf "
              "(llama.cpp's type names: q8_0 is about a quarter of f32's size)",
        choices=GGUF_OUTTYPES)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)  # TP/PP/CP (-T -P -C)
    peft: PeftArgs = field(default_factory=PeftArgs)

    def __post_init__(self) -> None:
        if self.global_batch_size is None:  # the default, or TRL's accumulation steps
            object.__setattr__(self, "global_batch_size", self.accumulated_batch_size
                               or GLOBAL_BATCH)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_gpus

    @property
    def data_parallel_size(self) -> int:
        return max(1, self.world_size // max(1, self.parallel.model_parallel_size))

    @property
    def accumulated_batch_size(self) -> Optional[int]:
        """The global batch that --gradient_accumulation_steps gives (None: not given)."""
        if self.gradient_accumulation_steps is None:
            return None
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size

    @property
    def exports(self) -> tuple[str, ...]:
        """What the export step writes: ``merged`` (the Hugging Face model) and/or
        ``adapter`` (the PEFT adapter, PEFT runs only)."""
        if not self.peft.enabled:
            return ("merged",)
        return ("merged", "adapter") if self.export == "both" else (self.export,)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.peft.enabled else 1e-5

    def validate(self) -> None:
        problems = []
        if (self.hf_model_id is None) == (self.load is None):
            problems.append("give the base model: --hf_model_id (a Hugging Face directory, "
                            ".gguf file or cached hub id) or --load (a checkpoint), not both")
        if self.load is not None and self.vocab_extra_ids_list:
            problems.append("--vocab_extra_ids_list adds tokens to an imported model; a "
                            "checkpoint in --load keeps the tokenizer it was trained with")
        if not self.experiment or "/" in self.experiment or self.experiment.startswith("."):
            problems.append(f"--experiment {self.experiment!r}: a plain folder name")
        if not 0 <= self.max_rejected_fraction <= 1:
            problems.append(f"--max_rejected_fraction {self.max_rejected_fraction:g}: a "
                            "fraction between 0 and 1")
        if self.max_steps is not None and self.epochs is not None:
            problems.append("give --max_steps or --epochs, not both")
        for name in ("num_nodes", "num_gpus", "global_batch_size", "micro_batch_size",
                     "seq_length", "gradient_accumulation_steps", "eval_max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: not given
                problems.append(f"--{name} must be positive")
        accumulated = self.accumulated_batch_size
        if not problems and accumulated not in (None, self.global_batch_size):
            problems.append(
                f"--global_batch_size {self.global_batch_size} and "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps} disagree: "
                f"the steps give --micro_batch_size {self.micro_batch_size} x "
                f"{self.gradient_accumulation_steps} x data-parallel size "
                f"{self.data_parallel_size} = {accumulated}; give one of them")
        if not problems:
            problems += self.parallel.problems(
                self.world_size, world=f"{self.num_nodes} node(s) x --num_gpus {self.num_gpus} "
                                      f"= {self.world_size} processes are",
                micro_batch_size=self.micro_batch_size,
                global_batch_size=self.global_batch_size, seq_length=self.seq_length)
        if self.executor == "local" and self.num_nodes > 1 and self.master_addr == "127.0.0.1":
            problems.append("--num_nodes > 1 with the local executor: run the command on every "
                            "node with --node_rank and --master_addr (the first node)")
        if self.export == "adapter" and not self.peft.enabled:
            problems.append("--export adapter needs --peft (full finetuning trains no adapter): "
                            "--export merged")
        problems += self.peft.problems(max(1, self.parallel.tensor_model_parallel_size))
        problems += self._unused_problems()
        if problems:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))

    def _unused_problems(self) -> list[str]:
        """Settings that this launch would not read (another executor's): refused, not
        silently ignored."""
        from megatron_ext.launch.executors.base import get_executor

        unused: dict[str, list[str]] = {}  # what would read them -> the flags given
        for name, reader in get_executor(self.executor).unused_settings(self).items():
            if getattr(self, name) != _DEFAULTS[name]:
                value = getattr(self, name)
                unused.setdefault(reader, []).append(flag_name(SFTConfig, name) + (
                    "" if isinstance(value, bool) else f" {shlex.join(map(str, value))}"
                    if isinstance(value, tuple) else f" {shlex.quote(str(value))}"))
        return [f"{', '.join(flags)}: only read with {reader}, which this command does not "
                f"have; remove them, or launch with {reader}"
                for reader, flags in unused.items()]

    def identity(self) -> dict:
        """What defines the experiment (a rerun must keep it), resolved: the effective
        learning rate and epochs (a default given explicitly is no difference), and
        local paths absolute and normalised (``./data/`` and ``/abs/data`` are one)."""
        import json

        values = json.loads(json.dumps(dataclasses.asdict(self)))  # as experiment.json holds it
        values["lr"] = self.learning_rate
        if self.max_steps is None and self.epochs is None:
            values["epochs"] = 1.0
        elif values["epochs"] is not None:
            values["epochs"] = float(values["epochs"])
        for name in ("dataset_path", "hf_model_id", "load"):
            values[name] = _resolved_path(values[name])
        if not self.peft.enabled:  # their values do nothing (and are refused when given)
            values["peft"] = {"peft": None}
        return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS
                and k not in ("experiment",)}

    @classmethod
    def from_identity(cls, identity: dict, experiment: str, **runtime) -> "SFTConfig":
        """The configuration an experiment's :meth:`identity` was made with (``runtime``:
        how this launch runs); keys of another version are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in identity.items() if k in known and k != "peft"}
        peft = dict(identity.get("peft") or {})
        if "peft_target_modules" in peft:
            peft["peft_target_modules"] = tuple(peft["peft_target_modules"])
        fields = {f.name for f in dataclasses.fields(PeftArgs)}
        return cls(experiment=experiment, **values, **runtime,
                   peft=(PeftArgs(**{k: v for k, v in peft.items() if k in fields})
                         if peft.get("peft") else PeftArgs()))


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SFTConfig)
             if f.default is not dataclasses.MISSING}


def _resolved_path(path: Optional[str]) -> Optional[str]:
    """A local path absolute, normalised and with links resolved; anything else (a hub
    id) as given."""
    if path is None or not os.path.exists(path):
        return path
    return os.path.realpath(path)
