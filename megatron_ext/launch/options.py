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
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.cli import option
from megatron_ext.errors import ConfigError
from megatron_ext.launch.executors import executor_names
from megatron_ext.parallel import ParallelArgs
from megatron_ext.peft.config import PeftArgs

EXECUTORS = executor_names()  # the files of launch/executors/
# fields that say how this launch runs, not what the experiment is
RUNTIME_FIELDS = frozenset({
    "executor", "num_nodes", "num_gpus", "parallel", "micro_batch_size", "account",
    "partition", "container_image", "container_mounts", "time", "dry_run", "restart", "wait",
    "wandb_project", "node_rank", "master_addr", "master_port", "experiments_dir",
    "save_interval", "bf16", "progress", "cpu", "cpus_per_task", "rdzv_port",
    "max_rejected_fraction"})


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
              "the local Hugging Face cache (never downloaded)", aliases=("--model",))
    load: Optional[str] = option(None, "base model: a checkpoint of this project (any form) "
                                       "instead of --hf_model_id")
    experiments_dir: str = option("experiments", "where experiment folders live")
    executor: str = option("local", "where to run: local (torchrun here) or slurm (sbatch)",
                           choices=EXECUTORS)
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
              "(tokens it already has keep their ids)")
    seq_length: int = option(2048, "longest sample in tokens: longer records are truncated, "
                                   "samples are packed into rows of this length")
    # -- schedule
    max_steps: Optional[int] = option(None, "optimizer steps (default: --epochs passes)")
    epochs: Optional[float] = option(
        None, "passes over the training split (default 1 without --max_steps): the steps "
              "are computed from the tokenized record count and the global batch, once")
    global_batch_size: int = option(32, "samples per optimizer step",
                                    names=("--global_batch_size", "-g"))
    micro_batch_size: int = option(1, "samples per forward pass on each data-parallel rank",
                                   names=("--micro_batch_size", "-m"))
    lr: Optional[float] = option(None, "peak learning rate (default 1e-4 with --peft, else "
                                       "1e-5)")
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
    parallel: ParallelArgs = field(default_factory=ParallelArgs)  # TP/PP/CP (-T -P -C)
    peft: PeftArgs = field(default_factory=PeftArgs)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_gpus

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
                     "seq_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be positive")
        if not problems:
            problems += self.parallel.problems(
                self.world_size, world=f"{self.num_nodes} node(s) x --num_gpus {self.num_gpus} "
                                      f"= {self.world_size} processes are",
                micro_batch_size=self.micro_batch_size,
                global_batch_size=self.global_batch_size, seq_length=self.seq_length)
        if self.executor == "local" and self.num_nodes > 1 and self.master_addr == "127.0.0.1":
            problems.append("--num_nodes > 1 with the local executor: run the command on every "
                            "node with --node_rank and --master_addr (the first node)")
        problems += self.peft.problems(max(1, self.parallel.tensor_model_parallel_size))
        if problems:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))

    def identity(self) -> dict:
        """What defines the experiment (a rerun must keep it)."""
        import json

        values = json.loads(json.dumps(dataclasses.asdict(self)))  # as experiment.json holds it
        return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS
                and k not in ("experiment",)}
