"""One command from a dataset folder and a base model to a finetuned model.

The steps, each skipped when its result is already there (so the same command
resumes): open the experiment (refused if made by another configuration;
finished: say so), import the base model, tokenize the splits into the
content-keyed cache, fix the number of steps (from ``--epochs`` once, stored),
train (an executor of ``launch/executors/``: ``torchrun`` here, or an sbatch job
that runs the same steps), then evaluate on the test split and export the Hugging
Face model (and the PEFT adapter). The trainer's flags are not typed here: they are
the trainer's own :class:`TrainConfig` written back as the flags its parser reads
(:meth:`ConfigParser.to_argv`). Nothing here imports torch: the trainer and the
tools run as subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.records import RecordKeys
from megatron_ext.errors import ConfigError, UserError
from megatron_ext.launch.base_model import (
    BaseModel,
    hf_backend_reason,
    import_cache_dir,
    planned_base,
)
from megatron_ext.launch.dataset import count_lines, find_splits, record_keys
from megatron_ext.launch.executors.base import ENDED, TRAINED, Launch, get_executor
from megatron_ext.launch.experiment import Experiment, move_aside, open_experiment, steps_for
from megatron_ext.launch.local import run_in_process, stamp
from megatron_ext.launch.options import SFTConfig
from megatron_ext.peft.config import PeftArgs
from megatron_ext.tokenizers import TokenizerArgs
from megatron_ext.training.arguments import build_parser as build_trainer_parser
from megatron_ext.training.config import (
    BackendArgs,
    CheckpointArgs,
    DataArgs,
    ModelArgs,
    OptimArgs,
    PrecisionArgs,
    ScheduleArgs,
    TrainConfig,
)

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(REPO, "finetune.py")
SFT = os.path.join(REPO, "instruct", "sft.py")
TOOLS = os.path.join(REPO, "tools")


@dataclass
class Outcome:
    experiment: Experiment
    state: str  # finished | stopped | submitted | planned
    message: str


def _tokenizer_args(config: SFTConfig, base) -> TokenizerArgs:
    """The trainer's tokenizer: the import's own (the trainer finds it in the import cache;
    only the added tokens are said), or the one a checkpoint of ours names."""
    if base.imported is not None:
        return TokenizerArgs(tokenizer_type=None, vocab_extra_ids_list=base.extra_ids)
    t = base.tokenizer
    return TokenizerArgs(tokenizer_type=t.tokenizer_type, vocab_file=t.vocab_file,
                         vocab_extra_ids_list=",".join(t.extra_ids) or None,
                         megatron_llm_specials=t.megatron_llm_specials)


def _on_hf_backend(base) -> bool:
    """Whether the base model trains on the hf backend (a model no family claims, or
    ``--backend hf``); any base-like object without the field is megatron's."""
    return getattr(base, "backend", "megatron") == "hf"


def trainer_config(config: SFTConfig, exp: Experiment, base) -> TrainConfig:
    """finetune.py's configuration for this launch: from the base model, or from the
    experiment's latest checkpoint when there is one (``--auto_resume``; LoRA/DoRA runs
    resume their adapters from --save by themselves), so the same flags serve every
    launch, a requeued Slurm job included."""
    prefixes = exp.prefixes
    imported = base.imported is not None
    native = _on_hf_backend(base)
    return TrainConfig(
        # (auto chooses hf again for a model no family claims, and logs why)
        backend=BackendArgs(backend="hf" if native and config.backend == "hf" else "auto"),
        model=ModelArgs(seq_length=config.seq_length),
        parallel=config.parallel,
        precision=PrecisionArgs(bf16=config.bf16),
        data=DataArgs(train_data_path=(prefixes["training"],),
                      valid_data_path=((prefixes["validation"],) if "validation" in prefixes
                                       else ()),
                      variable_seq_lengths=True, pack_sequences=True),
        tokenizer=_tokenizer_args(config, base),
        optim=OptimArgs(lr=config.learning_rate, min_lr=config.min_lr,
                        lr_decay_style="cosine", lr_warmup_iters=config.warmup_steps,
                        weight_decay=config.weight_decay),
        schedule=ScheduleArgs(
            micro_batch_size=config.micro_batch_size,
            global_batch_size=config.global_batch_size, train_iters=exp.train_iters,
            seed=config.seed, log_interval=1, save_interval=config.save_interval,
            eval_interval=config.save_interval, eval_iters=4,
            wandb_project=config.wandb_project,
            wandb_exp_name=config.experiment if config.wandb_project else None),
        checkpoint=CheckpointArgs(
            save=exp.checkpoints, load=base.source, finetune=not imported and not native,
            auto_resume=True, use_checkpoint_args=not native,
            tensorboard_dir=exp.path("tensorboard"),
            # an imported base model: the trainer reuses the launcher's import
            import_cache_dir=import_cache_dir(config.experiments_dir) if imported else None),
        peft=(dataclasses.replace(config.peft, peft_target_modules=config.peft.target_names())
              if config.peft.enabled else PeftArgs()))


def trainer_args(config: SFTConfig, exp: Experiment, base) -> list[str]:
    """finetune.py's flags for this launch: :func:`trainer_config` written as the flags
    that finetune.py's own parser reads back (those that differ from its defaults)."""
    return build_trainer_parser().to_argv(trainer_config(config, exp, base))


def _tools_command(tool: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(TOOLS, tool), *args]


def plan_text(config: SFTConfig, exp: Experiment, commands: list[list[str]], notes: list[str]
              ) -> str:
    lines = [f"experiment {config.experiment}: {exp.root} ({exp.status})",
             f"  base model: {config.hf_model_id or config.load}",
             f"  data: {config.dataset_path}"]
    lines += [f"  {note}" for note in notes]
    p = config.parallel
    cp, ep = p.context_parallel_size, p.expert_model_parallel_size
    dp = config.world_size // p.model_parallel_size
    lines.append(f"  layout: {config.num_nodes} node(s) x {config.num_gpus} process(es) = TP "
                 f"{p.tensor_model_parallel_size} x PP "
                 f"{p.pipeline_model_parallel_size} x " + (f"CP {cp} x " if cp > 1 else "")
                 + f"DP {dp}" + (f" (experts: EP {ep})" if ep > 1 else "") + "; micro batch "
                 f"{config.micro_batch_size}, global batch {config.global_batch_size}")
    lines.append(f"  steps: {exp.train_iters}; lr {config.learning_rate:g} "
                 f"({config.peft.peft or 'full finetuning'})")
    lines.append("  commands:")
    lines += ["    " + " ".join(shlex.quote(part) for part in command) for command in commands]
    return "\n".join(lines)


def config_of_experiment(experiments_dir: str, name: str) -> SFTConfig:
    """The configuration an experiment was made with (for ``sft.py --post_only``, which
    a Slurm job runs with the experiment's name only)."""
    from megatron_ext.launch.experiment import RECORD

    path = os.path.join(experiments_dir, name, RECORD)
    try:
        with open(path, encoding="utf-8") as handle:
            identity = json.load(handle)["identity"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: no experiment to finish ({exc})") from None
    return SFTConfig.from_identity(identity, name, experiments_dir=experiments_dir)


def run_sft(config: SFTConfig, post_only: bool = False) -> Outcome:
    """Everything the command does; ``post_only``: evaluation and export of a trained
    experiment (the tail of a Slurm job)."""
    config.validate()
    root = os.path.abspath(os.path.join(config.experiments_dir, config.experiment))
    restart = config.restart and not config.dry_run and not post_only
    # --restart: the folder is moved aside once this command is known to be launchable
    exp = Experiment(root, config.identity()) if restart else open_experiment(
        root, config.identity())
    if exp.status == "finished":
        return Outcome(exp, "finished", _finished_text(exp, already=True))
    exp.results.setdefault("started", time.time())  # the summary's total time
    source = find_splits(config.dataset_path)
    # the records' format, before the model's import: a mistake in the data shows at once
    keys = record_keys(source, RecordKeys(config.question_key, config.answer_key,
                                          config.system_key, config.messages_key))
    # (a Slurm job's evaluation step: the launch that trained checked the model)
    planned = None if post_only else planned_base(config.hf_model_id, config.load,
                                                  config.experiments_dir, config.backend)
    if planned is not None:
        check_model_fits(config, exp, planned)
    if restart:
        moved = move_aside(root)
        if moved:
            logger.info("--restart: the previous experiment is kept in %s", moved)
    if config.dry_run:
        return _dry_run(config, exp, source, planned, keys)
    if not post_only:
        for note in source.notes:
            logger.warning("%s: %s", config.dataset_path, note)

    from megatron_ext.launch.base_model import prepare_base
    from megatron_ext.launch.dataset import report_rejects, tokenize

    base = prepare_base(config)
    from megatron_ext.checkpointing.run_config import default_chat_format
    from megatron_ext.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(base.tokenizer)
    chat_format = config.chat_format or default_chat_format(tokenizer)
    identity = tokenizer.identity()
    data = tokenize(source, os.path.join(os.path.abspath(config.experiments_dir), ".tokenized"),
                    base.tokenizer, identity, chat_format, config.prompt_template,
                    dataclasses.asdict(keys), config.seq_length,
                    workers=min(8, os.cpu_count() or 1), progress=config.progress)
    if not post_only:  # (a Slurm job's evaluation: the launch that trained checked them)
        report_rejects(data, source, exp.path("rejected"), config.max_rejected_fraction)
    if exp.data_key is not None and exp.data_key != data.key:
        raise UserError(f"the data of experiment {config.experiment} changed since it started "
                        f"(tokenized key {exp.data_key} -> {data.key}): {config.dataset_path}'s "
                        "files differ; --restart to train on the new data, or restore them")
    exp.data_key, exp.prefixes, exp.records = data.key, data.prefixes, data.records
    if exp.train_iters is None:  # fixed once: a resumed run never recomputes it
        exp.train_iters = config.max_steps or steps_for(
            packed_rows(data.prefixes["training"], config.seq_length), config.epochs or 1.0,
            config.global_batch_size)
    exp.status = "training"
    exp.save()
    _link_metrics(exp)
    if not post_only:
        stopped = _train(config, exp, base)
        if stopped is not None:
            return stopped
    elif (exp.latest_iteration() or 0) < exp.train_iters:
        return Outcome(exp, "stopped", f"training is at iteration {exp.latest_iteration() or 0} "
                                       f"of {exp.train_iters}: not evaluated or exported yet")
    return _finish(config, exp, source, keys, _evaluation(config, base, chat_format))


def packed_rows(prefix: str, seq_length: int) -> int:
    """Rows of ``seq_length`` positions that an epoch of the tokenized records packs into:
    the trainer's samples (``--pack_sequences``), the same count as it computes."""
    from megatron_ext.data.indexed import sequence_lengths
    from megatron_ext.data.packing import packed_row_count

    lengths = sequence_lengths(prefix)
    rows = packed_row_count(lengths, seq_length)
    logger.info("training: %d records packed into %d rows of %d positions (a sample of the "
                "global batch is a row)", len(lengths), rows, seq_length)
    return rows


def _evaluation(config: SFTConfig, base, chat_format: Optional[str]) -> tuple[str, ...]:
    """The pretrained base model and chat format for the baseline evaluation (evaluate.py's
    flags; the finetuned checkpoint records its chat format itself)."""
    if not config.baseline or _on_hf_backend(base):  # (the base is no checkpoint of ours)
        return ()
    flags = ("--load", base.imported or base.source)
    if chat_format:
        flags += ("--chat_format", chat_format)
        if config.prompt_template:
            flags += ("--prompt_template", config.prompt_template)
    return flags


def _link_metrics(exp: Experiment) -> None:
    """``metrics.jsonl`` at the experiment's top (the trainer writes it beside the
    checkpoints)."""
    link = exp.path("metrics.jsonl")
    if not os.path.lexists(link):
        os.symlink(os.path.join("checkpoints", "metrics.jsonl"), link)


def check_model_fits(config: SFTConfig, exp: Experiment, base: BaseModel) -> None:
    """Refuse, before anything is imported, tokenized or launched, a launch whose base
    model the trainer would refuse: the trainer's own check (``TrainConfig.validate``, which
    its run plan ends with) of the configuration this launch gives it, with the model's
    shape as ``--use_checkpoint_args`` reads it from the base (heads and key/value heads
    over TP, layers over PP, hidden size over the heads, ...)."""
    from megatron_ext.training.plan import with_saved_model

    if _on_hf_backend(base):
        if config.export_gguf:
            raise ConfigError(f"--export_gguf: {base.source} trains on the hf backend (no "
                              "family claims it), whose models export to Hugging Face only; "
                              "convert that export with llama.cpp's convert_hf_to_gguf.py")
        trainer = trainer_config(config, dataclasses.replace(
            exp, prefixes=exp.prefixes or {"training": "<tokenized>/training"},
            train_iters=exp.train_iters or 1), base)
        dataclasses.replace(trainer, backend=BackendArgs(backend="hf")).validate(
            config.world_size, model_shape=False)
        return
    planned = dataclasses.replace(  # the data and the steps are settled later
        exp, prefixes=exp.prefixes or {"training": "<tokenized>/training"},
        train_iters=exp.train_iters or 1)
    trainer = with_saved_model(trainer_config(config, planned, base), base.model)
    try:
        trainer.validate(config.world_size)
    except ConfigError as exc:
        m = trainer.model
        problems = str(exc).split("\n", 1)[-1]
        raise ConfigError(
            f"the base model {base.source} ({m.num_layers} layers, {m.num_attention_heads} "
            f"attention heads, {m.num_attention_heads_kv or m.num_attention_heads} key/value "
            f"heads, hidden size {m.hidden_size}) does not fit this launch "
            f"({config.num_nodes} node(s) x {config.num_gpus} process(es)):\n{problems}\n"
            "change the layout (-T, -P, -C, -G) or the batch sizes; rerunning the same command "
            "fails the same way") from None


def resolve_trainer_plan(config: SFTConfig, exp: Experiment, base: BaseModel):
    """The run plan every rank of the trainer will resolve (``training/plan.py``), resolved
    here with the base model's import, so a configuration it refuses is said once, before
    torchrun starts."""
    from megatron_ext.checkpointing.run_config import load_run_config
    from megatron_ext.training.plan import resolve

    imported = (base.imported, load_run_config(base.imported)) if base.imported else None
    return resolve(trainer_config(config, exp, base), world_size=config.world_size,
                   importer=lambda *_: imported, announce=False)


def _dry_run(config: SFTConfig, exp: Experiment, source, planned: BaseModel,
             keys: RecordKeys) -> Outcome:
    notes = [f"splits: {', '.join(f'{k} {v}' for k, v in source.paths.items())}",
             *source.notes]
    if _on_hf_backend(planned):
        notes.append(f"backend: hf ({hf_backend_reason(planned.source, config.backend)}: "
                     "transformers' own model, not imported; no baseline evaluation)")
    if exp.train_iters is None:
        if config.max_steps:
            exp.train_iters = config.max_steps
        elif source.kind == "jsonl":
            lines = count_lines(source.paths["training"])
            exp.train_iters = steps_for(lines, config.epochs or 1.0, config.global_batch_size)
            notes.append(f"steps estimated from {lines} training lines, one a sample (fixed "
                         "at launch from the rows of --seq_length tokens that the records the "
                         "tokenizer accepts pack into: fewer)")
    prefixes = exp.prefixes or {split: f"<tokenized>/{split}" for split in source.paths}
    exp.prefixes = prefixes
    commands = get_executor(config.executor).commands(_launch(config, exp, planned))
    commands += _post_commands(config, exp, source, keys,
                               _evaluation(config, planned, config.chat_format))
    text = plan_text(config, exp, commands, notes)
    return Outcome(exp, "planned", text)


def _launch(config: SFTConfig, exp: Experiment, base) -> Launch:
    """This launch of the training, as the executor gets it."""
    post = (sys.executable, SFT, "--post_only", "--experiment", config.experiment,
            "--experiments_dir", os.path.abspath(config.experiments_dir),
            *(() if config.baseline else ("--no_baseline",)),
            *(() if config.export == "both" else ("--export", config.export)),
            *(("--export_gguf", config.export_gguf) if config.export_gguf else ()))
    return Launch(config, exp, FINETUNE, tuple(trainer_args(config, exp, base)), REPO, post)


def _train(config: SFTConfig, exp: Experiment, base) -> Optional[Outcome]:
    """Train to the last step (None), or the Outcome of a launch that did not (stopped,
    submitted) or that also evaluated and exported (a Slurm job followed to its end)."""
    latest = exp.latest_iteration()
    if latest is not None:
        logger.info("resuming experiment %s from %s (iteration %d of %d)", config.experiment,
                    exp.checkpoints, latest, exp.train_iters)
    resolve_trainer_plan(config, exp, base)
    ran = get_executor(config.executor).run(_launch(config, exp, base))
    if ran.state == TRAINED:
        return None
    if ran.state == ENDED:  # the launch ran training, evaluation and export as far as it got
        done = open_experiment(exp.root, exp.identity)
        if done.status == "finished":
            return Outcome(done, "finished", ran.message + "\n"
                           + _finished_text(done, already=False))
        return Outcome(exp, "stopped", ran.message)
    return Outcome(exp, ran.state, ran.message)


def _post_commands(config: SFTConfig, exp: Experiment, source, keys: RecordKeys,
                   baseline: tuple[str, ...] = ()) -> list[list[str]]:
    """After training: the baseline evaluation (``baseline``: its flags; once per experiment),
    the finetuned model's evaluation on the test split, the exports of ``--export``."""
    commands = []
    if source.kind == "jsonl" and "test" in source.paths:
        flags = {"--question_key": keys.question, "--answer_key": keys.answer,
                 "--system_key": keys.system, "--messages_key": keys.messages,
                 "--context_key": keys.context}

        def evaluate(load: tuple[str, ...], name: str) -> list[str]:
            return _tools_command(
                "evaluate.py", *load, "--input", source.paths["test"],
                *[part for flag, key in flags.items() if key for part in (flag, key)],
                "--max_new_tokens", str(config.eval_max_new_tokens), "--batch_size", "8",
                "--summary_json", exp.path("eval", f"{name}.json"),
                "--output", exp.path("eval", f"{name}_predictions.jsonl"),
                *([] if config.progress else ["--no_progress"]))

        if baseline and not os.path.exists(exp.path("eval", "baseline.json")):
            commands.append(evaluate(baseline, "baseline"))
        commands.append(evaluate(("--load", exp.checkpoints), "test"))
    if "merged" in config.exports:
        commands.append(_tools_command("megatron_to_hf.py", "--load", exp.checkpoints, "--out",
                                       exp.path("hf"), "--overwrite",
                                       *([] if config.progress else ["--no_progress"])))
    if "adapter" in config.exports:
        commands.append(_tools_command("megatron_to_hf.py", "--load", exp.checkpoints, "--out",
                                       exp.path("adapter"), "--adapter_only", "--overwrite"))
    if config.export_gguf:
        commands.append(_tools_command("megatron_to_gguf.py", "--load", exp.checkpoints, "--out",
                                       _gguf_path(exp, config.export_gguf), "--outtype",
                                       config.export_gguf, "--force",
                                       *([] if config.progress else ["--no_progress"])))
    return commands


def _gguf_path(exp: Experiment, outtype: str) -> str:
    return exp.path("gguf", f"model-{outtype}.gguf")


def _finish(config: SFTConfig, exp: Experiment, source, keys: RecordKeys,
            baseline: tuple[str, ...] = ()) -> Outcome:
    for command in _post_commands(config, exp, source, keys, baseline):
        name = os.path.basename(command[1]).removesuffix(".py")
        if exp.path("eval", "baseline.json") in command:
            name = "baseline"  # evaluate.py on the pretrained base
        log = exp.path("logs", f"{name}-{stamp()}.log")
        code = run_in_process(command, log)  # one process: torch is imported once
        if code != 0:
            raise UserError(f"{name} failed (exit {code}); the log is {log}. Rerun the same "
                            "command to try again (training is not repeated)")
    from megatron_ext.launch import report

    metrics = exp.path("metrics.jsonl")
    losses = report.read_losses(metrics)
    started = exp.results.get("started")
    results = {"iteration": exp.latest_iteration(), "started": started,
               "seconds": time.time() - started if started else None,
               "train_seconds": report.train_seconds(metrics),
               "train_loss": losses["train"][-1][1] if losses["train"] else None,
               "valid_loss": losses["valid"][-1][1] if losses["valid"] else None,
               "loss_png": report.plot_losses(metrics, exp.path("loss.png")),
               "tensorboard": exp.path("tensorboard")}
    if "merged" in config.exports:
        results["hf"] = exp.path("hf")
    if "adapter" in config.exports:
        results["adapter"] = exp.path("adapter")
    if config.export_gguf:
        results["gguf"] = _gguf_path(exp, config.export_gguf)
    for key, name in (("test", "test"), ("baseline", "baseline")):
        summary = exp.path("eval", f"{name}.json")
        if os.path.exists(summary):
            with open(summary, encoding="utf-8") as handle:
                results[key] = json.load(handle)
    exp.results, exp.status = results, "finished"
    exp.save()
    return Outcome(exp, "finished", _finished_text(exp, already=False))


def _finished_text(exp: Experiment, already: bool) -> str:
    from megatron_ext.launch.report import finished_text

    return finished_text(exp.root, exp.results, already)
