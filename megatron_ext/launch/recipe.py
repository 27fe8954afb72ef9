"""One command from a dataset folder and a base model to a finetuned model.

The steps, each skipped when its result is already there (so the same command
resumes): open the experiment (refused if made by another configuration;
finished: say so), import the base model, tokenize the splits into the
content-keyed cache, fix the number of steps (from ``--epochs`` once, stored),
train (``torchrun`` here, or an sbatch job that runs the same steps), then
evaluate on the test split and export the Hugging Face model (and the PEFT
adapter). Nothing here imports torch: the trainer and the tools run as
subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_ext.errors import UserError
from megatron_ext.launch.dataset import count_lines, find_splits
from megatron_ext.launch.experiment import Experiment, move_aside, open_experiment, steps_for
from megatron_ext.launch.local import child_env, run_logged, torchrun_command
from megatron_ext.launch.options import SFTConfig

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(REPO, "finetune.py")
SFT = os.path.join(REPO, "instruct", "sft.py")
TOOLS = os.path.join(REPO, "tools")


class TrainingFailed(UserError):
    """The trainer exited with an error (its log says why)."""


@dataclass
class Outcome:
    experiment: Experiment
    state: str  # finished | stopped | submitted | planned
    message: str


def _peft_flags(config: SFTConfig) -> list[str]:
    p = config.peft
    if not p.enabled:
        return []
    return ["--peft", p.peft, "--peft_target_modules", *p.target_names(), "--peft_dim",
            str(p.peft_dim), "--peft_alpha", str(p.peft_alpha), "--peft_dropout",
            str(p.peft_dropout), "--lora_A_init", p.lora_A_init]


def _tokenizer_flags(tokenizer) -> list[str]:
    if tokenizer is None:  # a dry run: known once the base model is imported
        return ["--tokenizer_type", "<the import's>", "--vocab_file", "<the import's>"]
    flags = ["--tokenizer_type", tokenizer.tokenizer_type, "--vocab_file", tokenizer.vocab_file]
    if tokenizer.extra_ids:
        flags += ["--vocab_extra_ids_list", ",".join(tokenizer.extra_ids)]
    if not tokenizer.megatron_llm_specials:
        flags.append("--no_megatron_llm_specials")
    return flags


def trainer_args(config: SFTConfig, exp: Experiment, base) -> list[str]:
    """finetune.py's flags for this launch: from the base model, or from the experiment's
    latest checkpoint when there is one (``--auto_resume``; LoRA/DoRA runs resume their
    adapters from --save by themselves), so the same flags serve every launch, a
    requeued Slurm job included."""
    prefixes = exp.prefixes
    args = ["--train_data_path", prefixes["training"]]
    if "validation" in prefixes:
        args += ["--valid_data_path", prefixes["validation"]]
    args += [
        "--seq_length", str(config.seq_length), "--variable_seq_lengths", "--pack_sequences",
        "--micro_batch_size", str(config.micro_batch_size),
        "--global_batch_size", str(config.global_batch_size),
        "--train_iters", str(exp.train_iters), "--lr", repr(config.learning_rate),
        "--min_lr", repr(config.min_lr), "--lr_warmup_iters", str(config.warmup_steps),
        "--lr_decay_style", "cosine", "--weight_decay", repr(config.weight_decay),
        "--seed", str(config.seed), "--log_interval", "1",
        "--save_interval", str(config.save_interval), "--eval_interval",
        str(config.save_interval), "--eval_iters", "4",
        "--tensor_model_parallel_size", str(config.tensor_model_parallel_size),
        "--pipeline_model_parallel_size", str(config.pipeline_model_parallel_size),
        "--context_parallel_size", str(config.context_parallel_size),
        "--save", exp.checkpoints, "--tensorboard_dir", exp.path("tensorboard"),
        "--use_checkpoint_args", "--auto_resume"]
    if config.bf16:
        args.append("--bf16")
    if config.wandb_project:
        args += ["--wandb_project", config.wandb_project, "--wandb_exp_name", config.experiment]
    args += ["--load", base.source] + _peft_flags(config)
    if base.imported is not None:  # the trainer reuses the launcher's import
        args += ["--import_cache_dir", exp.path("imported_models")]
        if config.vocab_extra_ids_list:
            args += ["--vocab_extra_ids_list", config.vocab_extra_ids_list]
    else:
        args += ["--finetune"] + _tokenizer_flags(base.tokenizer)
    return args


def _latest(checkpoints: str) -> Optional[int]:
    from megatron_ext.checkpointing.tracker import TRACKER, latest_iteration

    if not os.path.isdir(checkpoints):
        return None
    iteration = latest_iteration(checkpoints)
    if iteration is None and any(name.startswith("iter_") for name in os.listdir(checkpoints)):
        raise UserError(f"{checkpoints} holds checkpoints but no readable {TRACKER}: the "
                        "experiment will not silently start over; repair the tracker or "
                        "--restart")
    return iteration


def _tools_command(tool: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(TOOLS, tool), *args]


def plan_text(config: SFTConfig, exp: Experiment, commands: list[list[str]], notes: list[str]
              ) -> str:
    lines = [f"experiment {config.experiment}: {exp.root} ({exp.status})",
             f"  base model: {config.hf_model_id or config.load}",
             f"  data: {config.dataset_path}"]
    lines += [f"  {note}" for note in notes]
    cp = config.context_parallel_size
    dp = config.world_size // (config.tensor_model_parallel_size
                               * config.pipeline_model_parallel_size * cp)
    lines.append(f"  layout: {config.num_nodes} node(s) x {config.num_gpus} process(es) = TP "
                 f"{config.tensor_model_parallel_size} x PP "
                 f"{config.pipeline_model_parallel_size} x " + (f"CP {cp} x " if cp > 1 else "")
                 + f"DP {dp}; micro batch "
                 f"{config.micro_batch_size}, global batch {config.global_batch_size}")
    lines.append(f"  steps: {exp.train_iters}; lr {config.learning_rate:g} "
                 f"({config.peft.peft or 'full finetuning'})")
    lines.append("  commands:")
    lines += ["    " + " ".join(shlex.quote(part) for part in command) for command in commands]
    return "\n".join(lines)


def config_of_experiment(experiments_dir: str, name: str) -> SFTConfig:
    """The configuration an experiment was made with (for ``sft.py --post_only``, which
    a Slurm job runs with the experiment's name only)."""
    import dataclasses

    from megatron_ext.launch.experiment import RECORD
    from megatron_ext.peft.config import PeftArgs

    path = os.path.join(experiments_dir, name, RECORD)
    try:
        with open(path, encoding="utf-8") as handle:
            identity = json.load(handle)["identity"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: no experiment to finish ({exc})") from None
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    values = {k: v for k, v in identity.items() if k in known and k != "peft"}
    peft = identity.get("peft") or {}
    peft["peft_target_modules"] = tuple(peft.get("peft_target_modules") or ())
    return SFTConfig(experiment=name, experiments_dir=experiments_dir,
                     peft=PeftArgs(**peft) if peft.get("peft") else PeftArgs(), **values)


def run_sft(config: SFTConfig, post_only: bool = False) -> Outcome:
    """Everything the command does; ``post_only``: evaluation and export of a trained
    experiment (the tail of a Slurm job)."""
    config.validate()
    root = os.path.abspath(os.path.join(config.experiments_dir, config.experiment))
    if config.restart and not config.dry_run and not post_only:
        moved = move_aside(root)
        if moved:
            logger.info("--restart: the previous experiment is kept in %s", moved)
    exp = open_experiment(root, config.identity())
    if exp.status == "finished":
        return Outcome(exp, "finished", _finished_text(exp, already=True))
    source = find_splits(config.dataset_path)
    if config.dry_run:
        return _dry_run(config, exp, source)

    from megatron_ext.launch.base_model import prepare_base
    from megatron_ext.launch.dataset import tokenize

    base = prepare_base(config.hf_model_id, config.load, exp.path("imported_models"),
                        config.vocab_extra_ids_list, config.progress)
    from megatron_ext.checkpointing.run_config import default_chat_format
    from megatron_ext.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(base.tokenizer)
    chat_format = config.chat_format or default_chat_format(tokenizer)
    keys = {"question": config.question_key, "answer": config.answer_key,
            "system": config.system_key, "messages": config.messages_key}
    identity = tokenizer.identity()
    data = tokenize(source, os.path.join(os.path.abspath(config.experiments_dir), ".tokenized"),
                    base.tokenizer, identity, chat_format, config.prompt_template, keys,
                    config.seq_length, workers=min(8, os.cpu_count() or 1),
                    progress=config.progress)
    if exp.data_key is not None and exp.data_key != data.key:
        raise UserError(f"the data of experiment {config.experiment} changed since it started "
                        f"(tokenized key {exp.data_key} -> {data.key}): {config.dataset_path}'s "
                        "files differ; --restart to train on the new data, or restore them")
    exp.data_key, exp.prefixes, exp.records = data.key, data.prefixes, data.records
    if exp.train_iters is None:  # fixed once: a resumed run never recomputes it
        exp.train_iters = config.max_steps or steps_for(
            data.records["training"], config.epochs or 1.0, config.global_batch_size)
    exp.status = "training"
    exp.save()
    _link_metrics(exp)
    if not post_only:
        stopped = _train(config, exp, base)
        if stopped is not None:
            return stopped
    elif (_latest(exp.checkpoints) or 0) < exp.train_iters:
        return Outcome(exp, "stopped", f"training is at iteration {_latest(exp.checkpoints) or 0} "
                                       f"of {exp.train_iters}: not evaluated or exported yet")
    return _finish(config, exp, source)


def _link_metrics(exp: Experiment) -> None:
    """``metrics.jsonl`` at the experiment's top (the trainer writes it beside the
    checkpoints)."""
    link = exp.path("metrics.jsonl")
    if not os.path.lexists(link):
        os.symlink(os.path.join("checkpoints", "metrics.jsonl"), link)


def _dry_run(config: SFTConfig, exp: Experiment, source) -> Outcome:
    notes = [f"splits: {', '.join(f'{k} {v}' for k, v in source.paths.items())}"]
    if exp.train_iters is None:
        if config.max_steps:
            exp.train_iters = config.max_steps
        elif source.kind == "jsonl":
            lines = count_lines(source.paths["training"])
            exp.train_iters = steps_for(lines, config.epochs or 1.0, config.global_batch_size)
            notes.append(f"steps estimated from {lines} training lines (fixed at launch from "
                         "the records the tokenizer accepts)")
    prefixes = exp.prefixes or {split: f"<tokenized>/{split}" for split in source.paths}
    exp.prefixes = prefixes

    from megatron_ext.launch.base_model import BaseModel

    tokenizer = None
    if config.load is not None:
        from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
        from megatron_ext.checkpointing.sources import read_run_config

        tokenizer = tokenizer_config_from_run(config.load, read_run_config(config.load))
    planned = BaseModel(config.hf_model_id or config.load,
                        "<import>" if config.hf_model_id else None, tokenizer, {})
    args = trainer_args(config, exp, planned)
    commands = [torchrun_command(FINETUNE, args, config.num_gpus, config.num_nodes,
                                 config.node_rank, config.master_addr, config.master_port)]
    commands += _post_commands(config, exp, source)
    text = plan_text(config, exp, commands, notes)
    return Outcome(exp, "planned", text)


def _train(config: SFTConfig, exp: Experiment, base) -> Optional[Outcome]:
    """Train to the last step; an Outcome when the run stopped early (a signal)."""
    resume = _latest(exp.checkpoints) is not None
    if resume:
        logger.info("resuming experiment %s from %s (iteration %d of %d)", config.experiment,
                    exp.checkpoints, _latest(exp.checkpoints), exp.train_iters)
    args = trainer_args(config, exp, base)
    if config.executor == "slurm":
        from megatron_ext.launch.experiment import open_experiment as reopen
        from megatron_ext.launch.slurm_executor import submit_experiment

        outcome = submit_experiment(config, exp, args, REPO, FINETUNE, SFT)
        if outcome.state == "ended":  # --wait: the job ran training, evaluation and export
            done = reopen(exp.root, exp.identity)
            if done.status == "finished":
                return Outcome(done, "finished", outcome.message + "\n"
                               + _finished_text(done, already=False))
            outcome.state = "stopped"
        return outcome
    command = torchrun_command(FINETUNE, args, config.num_gpus, config.num_nodes,
                               config.node_rank, config.master_addr, config.master_port)
    log = exp.path("logs", f"train-{_stamp()}.log")
    finished = run_logged(command, log, child_env(config.num_gpus, REPO), REPO)
    latest = _latest(exp.checkpoints)
    if finished.signalled:  # the trainer saved and stopped (torchrun exits non-zero then)
        return Outcome(exp, "stopped",
                       f"training stopped at iteration {latest or 0} of {exp.train_iters} by a "
                       "signal; rerun the same command to resume")
    if finished.code != 0:
        raise TrainingFailed(f"training failed (exit {finished.code}); the log is {log}. Fix "
                             "the cause and rerun the same command: it resumes from the latest "
                             "checkpoint")
    if config.node_rank != 0:  # evaluation and export are the first node's
        return Outcome(exp, "stopped", f"node {config.node_rank}: training done")
    if latest is None or latest < exp.train_iters:
        return Outcome(exp, "stopped",
                       f"training stopped at iteration {latest or 0} of {exp.train_iters} "
                       f"(a signal or --exit conditions); rerun the same command to resume")
    return None


def _post_commands(config: SFTConfig, exp: Experiment, source) -> list[list[str]]:
    commands = []
    if source.kind == "jsonl" and "test" in source.paths:
        commands.append(_tools_command(
            "evaluate.py", "--load", exp.checkpoints, "--input", source.paths["test"],
            "--question_key", config.question_key, "--answer_key", config.answer_key,
            *(["--system_key", config.system_key] if config.system_key else []),
            *(["--messages_key", config.messages_key] if config.messages_key else []),
            "--max_new_tokens", "64", "--batch_size", "8",
            "--summary_json", exp.path("eval", "test.json"),
            "--output", exp.path("eval", "test_predictions.jsonl"),
            *([] if config.progress else ["--no_progress"])))
    commands.append(_tools_command("megatron_to_hf.py", "--load", exp.checkpoints, "--out",
                                   exp.path("hf"), "--overwrite",
                                   *([] if config.progress else ["--no_progress"])))
    if config.peft.enabled:
        commands.append(_tools_command("megatron_to_hf.py", "--load", exp.checkpoints, "--out",
                                       exp.path("adapter"), "--adapter_only", "--overwrite"))
    return commands


def _finish(config: SFTConfig, exp: Experiment, source) -> Outcome:
    env = child_env(1, REPO)
    for command in _post_commands(config, exp, source):
        name = os.path.basename(command[1]).removesuffix(".py")
        log = exp.path("logs", f"{name}-{_stamp()}.log")
        code = run_logged(command, log, env, REPO).code
        if code != 0:
            raise UserError(f"{name} failed (exit {code}); the log is {log}. Rerun the same "
                            "command to try again (training is not repeated)")
    results = {"iteration": _latest(exp.checkpoints), "hf": exp.path("hf")}
    if config.peft.enabled:
        results["adapter"] = exp.path("adapter")
    summary = exp.path("eval", "test.json")
    if os.path.exists(summary):
        with open(summary, encoding="utf-8") as handle:
            results["test"] = json.load(handle)
    exp.results, exp.status = results, "finished"
    exp.save()
    return Outcome(exp, "finished", _finished_text(exp, already=False))


def _finished_text(exp: Experiment, already: bool) -> str:
    r = exp.results
    lines = [f"experiment {os.path.basename(exp.root)} is {'already ' if already else ''}"
             f"finished: {r.get('iteration')} steps ({exp.root})"]
    test = r.get("test")
    if test:
        lines.append(f"  test split: answer loss {test.get('answer_loss', float('nan')):.4f}, "
                     f"exact match {100 * test.get('exact_match', 0):.1f}%, token F1 "
                     f"{100 * test.get('f1', 0):.1f}%")
    lines.append(f"  Hugging Face model: {r.get('hf')}")
    if r.get("adapter"):
        lines.append(f"  PEFT adapter: {r['adapter']}")
    if already:
        lines.append("  (--restart trains it again from the start)")
    return "\n".join(lines)


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")
