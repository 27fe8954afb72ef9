"""The run plan: what a training run loads, from where, which parts, with which model and
adapter settings, and whether it resumes, settled once before the trainer exists.

Why one step: the command line says what the user asked for; the checkpoint on disk
decides much of what that means (``--load`` of a Hugging Face directory is imported and
brings its shape and tokenizer; ``--auto_resume`` swaps ``--load`` for ``--save``'s own
checkpoint; an adapter checkpoint names its base; ``--use_checkpoint_args`` reads the
model's shape). :func:`resolve` makes each of those decisions in order, reading the
checkpoints' metadata here and nowhere else, and returns a frozen :class:`RunPlan` that
the trainer takes as it is. Its :meth:`RunPlan.summary` is logged at start, so a run
says what it loads and why.

Importing this module costs no torch, and neither does :func:`resolve` unless a model
must be imported (``importer``) or a Megatron-LLM legacy checkpoint read: the plan of a
run can be tested on its own.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_ext.checkpointing.adapters import adapter_run_config, base_of, base_record, check_base
from megatron_ext.checkpointing.dcp import hf_backend_checkpoint
from megatron_ext.checkpointing.forms import checkpoint_directory, run_config_of
from megatron_ext.checkpointing.run_config import load_run_config, tokenizer_config_from_run
from megatron_ext.checkpointing.tracker import latest_iteration
from megatron_ext.errors import CheckpointError, ConfigError
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.models.families import family_for_hf_config, get_family
from megatron_ext.models.import_sources import HF_DIRECTORY, import_source_kind, read_hf_config
from megatron_ext.peft.config import PeftArgs, resolve_targets
from megatron_ext.tokenizers import TokenizerArgs
from megatron_ext.training.config import CheckpointArgs, TrainConfig

# (--load and the import cache flags, the tokenizer flags) -> (the import's directory, its
# run config)
Importer = Callable[[CheckpointArgs, TokenizerArgs], "tuple[str, dict]"]


@dataclass(frozen=True)
class PeftPlan:
    """Where a LoRA/DoRA run's weights come from."""

    base_checkpoint: str  # the base weights (a checkpoint; an import for a Hugging Face model)
    resume: Optional[str]  # the adapter checkpoint to resume from, None for fresh adapters
    targets: tuple[str, ...]  # the adapted linear layers (megatron-core short names)
    record: dict  # the base as adapter checkpoints record it (path, identity)


@dataclass(frozen=True)
class RunPlan:
    """A training run, resolved: the trainer builds, loads and trains exactly this.

    ``config`` is the final configuration (the model's shape, the tokenizer and the
    adapter settings as the checkpoints decided them; ``config.checkpoint.load`` the
    checkpoint actually loaded). ``load`` is None for a run from scratch.
    """

    config: TrainConfig
    load: Optional[str] = None  # the checkpoint to load (full or the base's weights)
    weights_only: bool = False  # fresh optimizer and iteration 0 (finetune, base of adapters)
    allow_missing: bool = False  # --load is --save's own folder, still empty on a first launch
    resumed_from: Optional[str] = None  # the full or adapter checkpoint whose progress goes on
    peft: Optional[PeftPlan] = None
    saved_tokenizer: Optional[dict] = None  # the tokenizer identity saved with ``load``
    steps: tuple[str, ...] = field(default=())  # what was decided and why, in order
    backend: str = "megatron"  # what trains: megatron-core, or the Hugging Face model ("hf")
    hf_model: Optional[str] = None  # hf: the model directory or .gguf file it started from
    hf_config: Optional[dict] = None  # hf: the model's config.json

    @property
    def parts(self) -> str:
        """What the run's checkpoints hold: everything, or the adapters only."""
        return "adapters" if self.peft is not None else "all"

    @property
    def continues_logs(self) -> bool:
        """A resume whose metrics and checkpoints go on where it stopped: a full resume, or
        adapters resumed from this run's own ``--save``."""
        if self.peft is None:
            return self.resumed_from is not None
        save = self.config.checkpoint.save or ""
        return bool(self.peft.resume) and os.path.abspath(self.peft.resume) == os.path.abspath(
            save)

    def summary(self) -> str:
        """The plan in a few lines, for the log at start."""
        c = self.config
        if self.load is None:
            start = "from scratch (random init)"
        elif self.peft is not None:
            start = f"base weights from {self.load}"
        else:
            start = (f"weights only from {self.load}" if self.weights_only
                     else f"checkpoint {self.load} (full resume)")
        lines = [f"run plan: {start}"]
        if self.backend == "hf":
            lines.append(f"  backend hf: the Hugging Face model "
                         f"{(self.hf_config or {}).get('model_type')} of {self.hf_model} "
                         "(transformers' own code, FSDP2)")
        if self.peft is not None:
            adapters = (f"resumed from {self.peft.resume}" if self.peft.resume
                        else "fresh")
            lines.append(f"  {c.peft.peft} adapters ({adapters}) on "
                         f"{', '.join(self.peft.targets)}; checkpoints hold the adapters only")
        m = c.model
        if self.backend != "hf":
            lines.append(f"  model {m.model_name}: {m.num_layers} layers, hidden {m.hidden_size}, "
                         f"{m.num_attention_heads} heads"
                         + (" (shape from the checkpoint)" if c.checkpoint.use_checkpoint_args
                            else ""))
        lines.append(f"  tokenizer {c.tokenizer.tokenizer_type}: {c.tokenizer.vocab_file}")
        lines.append(f"  saves to {c.checkpoint.save}" if c.checkpoint.save
                     else "  saves nothing (no --save)")
        lines += [f"  - {step}" for step in self.steps]
        return "\n".join(lines)


def resolve(config: TrainConfig, *, world_size: Optional[int] = None,
            cuda: Optional[bool] = None, importer: Optional[Importer] = None,
            announce: Optional[bool] = None) -> RunPlan:
    """The run plan of ``config``: every decision that depends on the checkpoints on disk.

    In order: an adapter run (``--peft``, or ``--load`` of an adapter checkpoint) finds
    its base and resume point; ``--load`` of a Hugging Face model or GGUF file is
    imported (``importer``, by default the shared import cache; the ranks wait for one
    another through the file system); ``--auto_resume`` takes ``--save``'s checkpoint
    when there is one; ``--use_checkpoint_args`` reads the model's shape. Then the whole
    configuration is validated for ``world_size`` (default: torchrun's ``WORLD_SIZE``)
    and, when ``cuda`` is known, the device.
    """
    if announce is None:
        announce = int(os.environ.get("RANK", "0")) == 0
    steps: list[str] = []
    backend, why = choose_backend(config)
    if backend == "hf" or (config.checkpoint.imports_model and config.backend.backend == "auto"):
        steps.append(f"backend {backend}: {why}")  # (a checkpoint of ours: nothing to say)
    config = dataclasses.replace(config, backend=dataclasses.replace(config.backend,
                                                                     backend=backend))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "hf":
        return _plan_hf(config, steps, world_size, cuda)
    importer = importer or _import_cached(announce)
    peft: Optional[PeftPlan] = None
    c = config.checkpoint
    if config.peft.enabled or adapter_run_config(c.load or "") is not None:
        config, peft = _plan_peft(config, importer, steps)
    elif c.imports_model:
        config = _with_imported_model(config, importer, steps)
    if peft is None:
        config = _with_auto_resume(config, steps)
    if config.checkpoint.use_checkpoint_args and config.checkpoint.load:
        config = _with_checkpoint_model_args(config, steps)
    config.validate(world_size, cuda=cuda)
    return _plan(config, peft, steps)


def choose_backend(config: TrainConfig) -> tuple[str, str]:
    """(``megatron`` or ``hf``, why): ``--backend`` when it names one; for ``auto`` the
    backend of the checkpoint the run resumes, else megatron when a family in
    ``models/families`` claims the Hugging Face model of ``--load``, else hf."""
    c, chosen = config.checkpoint, config.backend.backend
    if chosen != "auto":
        return chosen, f"--backend {chosen}"
    for place, flag in ((c.save if c.auto_resume else None, "--save"), (c.load, "--load")):
        if hf_backend_checkpoint(place):
            return "hf", f"{flag} {place} holds a checkpoint of the hf backend"
        if place and _holds_checkpoint(place):
            return "megatron", f"{flag} {place} holds a megatron checkpoint"
    if import_source_kind(c.load) != HF_DIRECTORY:
        return "megatron", ("--load is a GGUF file: the importer reads its architecture"
                            if c.load else "no Hugging Face model to train (--load)")
    hf_config = read_hf_config(c.load)
    family = family_for_hf_config(hf_config)
    model_type = hf_config.get("model_type")
    if family is not None or not model_type:
        if family is None:
            return "megatron", f"{c.load}/config.json names no model_type"
        return "megatron", (f"family {family.name} (models/families) claims model_type "
                            f"{model_type!r}; --backend hf trains it with transformers' code")
    return "hf", (f"no family in models/families claims model_type {model_type!r}: "
                  "transformers' own model trains it")


def _holds_checkpoint(place: str) -> bool:
    """Whether ``place`` holds a checkpoint of ours (a damaged one too: its loader says
    what is wrong with it)."""
    try:
        return checkpoint_directory(place) is not None
    except CheckpointError:
        return True


def _plan_hf(config: TrainConfig, steps: list[str], world_size: int,
             cuda: Optional[bool]) -> RunPlan:
    """The plan of a Hugging Face backend run: the model directory (or GGUF file) it starts
    from, or the checkpoint of this backend it resumes (``--load``, or ``--save`` with
    ``--auto_resume``); the model's own tokenizer unless ``--vocab_file``."""
    from megatron_ext.hf_native.model import check_model_config, model_config

    c = config.checkpoint
    resume = None
    # adapters resume from --save whenever it holds some (as on the megatron backend)
    for place, flag in ((c.save if c.auto_resume or config.peft.enabled else None,
                         "--auto_resume: --save" if c.auto_resume else "--save"),
                        (None if c.finetune else c.load, "--load")):
        if hf_backend_checkpoint(place):
            resume = place
            steps.append(f"{flag} {place} holds a checkpoint of the hf backend: resuming it")
            break
    if resume is None and c.load and not c.imports_model and hf_backend_checkpoint(c.load):
        saved = load_run_config(hf_backend_checkpoint(c.load))  # --finetune from one
    elif resume is not None:
        saved = load_run_config(hf_backend_checkpoint(resume))
    else:
        saved = None
    if saved is not None:
        source, hf_config = saved["hf_model"]["path"], saved["hf_model"]["config"]
        if not config.tokenizer.vocab_file:
            config = dataclasses.replace(config, tokenizer=_own_tokenizer(
                config.tokenizer, TokenizerArgs(**saved["tokenizer"])))
    elif c.imports_model:
        source, hf_config = c.load, model_config(c.load)
        if not config.tokenizer.vocab_file:
            config = dataclasses.replace(config, tokenizer=model_dir_tokenizer(
                config.tokenizer, c.load, c))
    else:
        raise ConfigError(f"--backend hf: --load {c.load} is neither a Hugging Face model "
                          "(a directory with config.json, a .gguf file) nor a checkpoint of "
                          "the hf backend")
    check_model_config(hf_config, source, config.backend.trust_remote_code,
                       config.parallel.tensor_model_parallel_size)
    config.validate(world_size, cuda=cuda, model_shape=False)
    if resume is not None:
        check_optimizer_state(config, resume)
    load = resume or c.load
    peft = None
    if config.peft.enabled:  # the base from the model, the adapters from ``resume``
        peft = PeftPlan(source, resume, config.peft.target_names(), {"load": source})
        load = source
    return RunPlan(config, load=load, weights_only=resume is None or peft is not None,
                   allow_missing=False, resumed_from=resume, peft=peft,
                   saved_tokenizer=(saved or {}).get("tokenizer_identity"),
                   steps=tuple(steps), backend="hf", hf_model=source, hf_config=hf_config)


def model_dir_tokenizer(tokenizer: TokenizerArgs, load: str,
                        checkpoint: Optional[CheckpointArgs] = None) -> TokenizerArgs:
    """The tokenizer of the Hugging Face model ``load`` as an import takes it: its own ids
    (none of Megatron-LLM's additions) and the flags' extra tokens. A GGUF file's own is
    rebuilt once into the run's import cache (``checkpoint``'s; without it: refused)."""
    from megatron_ext.checkpointing.hf_import import tokenizer_source
    from megatron_ext.hf_native.model import model_files

    directory, gguf = model_files(load)
    if gguf is not None:
        if checkpoint is None:
            raise ConfigError(f"--backend hf with {load}: pass the tokenizer with "
                              "--vocab_file (a GGUF file's own is not read here)")
        from megatron_ext.checkpointing.import_cache import (
            default_cache_dir,
            ensure_gguf_tokenizer,
        )

        directory = ensure_gguf_tokenizer(os.path.join(directory, gguf),
                                          checkpoint.import_cache_dir
                                          or default_cache_dir(checkpoint.save))
    kind, vocab_file = tokenizer_source(None, tokenizer.tokenizer_type, lambda: directory, load)
    return dataclasses.replace(tokenizer, tokenizer_type=kind, vocab_file=vocab_file,
                               megatron_llm_specials=False)


def _plan(config: TrainConfig, peft: Optional[PeftPlan], steps: list[str]) -> RunPlan:
    """The loads of a resolved configuration."""
    c = config.checkpoint
    if peft is not None:
        if peft.resume:
            check_optimizer_state(config, peft.resume)
        return RunPlan(config, load=peft.base_checkpoint, weights_only=True,
                       resumed_from=peft.resume, peft=peft,
                       saved_tokenizer=_saved_tokenizer(peft.base_checkpoint),
                       steps=tuple(steps))
    if not c.load:
        return RunPlan(config, steps=tuple(steps))
    own = os.path.abspath(c.load) == os.path.abspath(c.save or "")
    if not c.finetune:
        check_optimizer_state(config, c.load)
    return RunPlan(config, load=c.load, weights_only=c.finetune,
                   allow_missing=own and not c.finetune,
                   resumed_from=None if c.finetune else c.load,
                   saved_tokenizer=_saved_tokenizer(c.load), steps=tuple(steps))


def optimizer_kind(precision: dict, parallel: dict) -> dict:
    """What the optimizer state of a run is made of: its precision (fp32 main weights
    beside bf16/fp16 ones, a grad scaler for fp16) and its form (megatron-core's plain
    optimizer, or the distributed one's parameter state)."""
    return {"precision": PrecisionArgs(bf16=bool(precision.get("bf16")),
                                       fp16=bool(precision.get("fp16"))).dtype_name,
            "optimizer": "distributed" if parallel.get("use_distributed_optimizer")
            else "plain"}


def check_optimizer_state(config: TrainConfig, load: str) -> None:
    """Refuse to resume the optimizer state of the checkpoint in ``load`` with another
    precision or optimizer: megatron-core's optimizers keep different state for each
    (fp32 main weights and a grad scaler beside half-precision models; the distributed
    optimizer's parameter state and param groups), and loading one into another fails
    deep inside megatron-core or not at all. Starting from the weights (``--finetune``)
    converts: the weights load into any precision, and the new optimizer starts fresh."""
    directory = checkpoint_directory(load)
    if directory is None:
        return
    try:
        saved = load_run_config(directory, missing_ok=True)
    except CheckpointError:
        return  # its loader says what is wrong with it
    if not saved or "precision" not in saved:
        return  # no run config (a converted checkpoint): nothing recorded to compare
    p = config.parallel
    ours = optimizer_kind(dataclasses.asdict(config.precision),
                          {"use_distributed_optimizer": p.use_distributed_optimizer})
    theirs = optimizer_kind(saved.get("precision") or {}, saved.get("parallel") or {})
    differ = [f"{key}: checkpoint {theirs[key]}, this run {ours[key]}"
              for key in ours if ours[key] != theirs[key]]
    if differ:
        flags = {"fp32": "neither --bf16 nor --fp16", "bf16": "--bf16", "fp16": "--fp16"}
        same = [flags[theirs["precision"]],
                "--use_distributed_optimizer" if theirs["optimizer"] == "distributed"
                else "no --use_distributed_optimizer"]
        raise CheckpointError(
            f"{directory} holds the optimizer state of another kind of run ("
            + "; ".join(differ) + f"): resume it with {' and '.join(same)}, or start from "
            "its weights with --finetune (a fresh optimizer of this run's kind)")


def _saved_tokenizer(load: str) -> Optional[dict]:
    """The tokenizer identity saved with the checkpoint in ``load`` (None: not recorded,
    or nothing readable there yet; an unreadable checkpoint is reported by its loader)."""
    directory = checkpoint_directory(load)
    if directory is None:
        return None
    try:
        return (load_run_config(directory, missing_ok=True) or {}).get("tokenizer_identity")
    except CheckpointError:
        return None


def _import_cached(announce: bool) -> Importer:
    """The default importer: ``checkpointing/import_cache.py`` (torch, imported on use)."""

    def run(c: CheckpointArgs, tokenizer: TokenizerArgs) -> tuple[str, dict]:
        from megatron_ext.checkpointing.import_cache import (
            ImportOptions,
            default_cache_dir,
            ensure_imported,
        )

        cached = ensure_imported(
            c.load, c.import_cache_dir or default_cache_dir(c.save),
            ImportOptions(vocab_extra_ids_list=tokenizer.vocab_extra_ids_list,
                          tokenizer_type=tokenizer.tokenizer_type,
                          vocab_file=tokenizer.vocab_file),
            announce=announce, progress=sys.stderr.isatty())
        return cached.path, cached.run_config

    return run


def _plan_peft(config: TrainConfig, importer: Importer,
               steps: list[str]) -> tuple[TrainConfig, PeftPlan]:
    """The base, the resume point and the adapter settings of a LoRA/DoRA run.

    ``--load`` is the base model (any checkpoint form, a Hugging Face directory or a
    GGUF file) and the run resumes from the adapter checkpoint in ``--save`` when there
    is one (the same command restarts a stopped run); ``--load`` may also name an
    adapter checkpoint, whose recorded base is then used. Either way the base must be
    the one the adapters were trained on, and the adapter settings the same.
    """
    c = config.checkpoint
    saved = adapter_run_config(c.load)
    resume = c.load if saved is not None else None
    if saved is not None:  # --load ADAPTERS: the recorded base
        base_load = saved["base"]["load"]
        base_checkpoint = base_of(saved, c.load)
        config = _with_saved_peft(config, saved, c.load)
        if not config.tokenizer.vocab_file:
            config = dataclasses.replace(config, tokenizer=_own_tokenizer(
                config.tokenizer, tokenizer_config_from_run(base_checkpoint, saved)))
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(
            c, load=base_checkpoint, finetune=True, use_checkpoint_args=True))
        steps.append(f"--load {c.load} holds adapters: their recorded base {base_checkpoint}, "
                     "their settings, and their progress")
    else:
        base_load = c.load
        if c.imports_model:
            config = _with_imported_model(config, importer, steps)
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(
            config.checkpoint, finetune=True, use_checkpoint_args=True))
        base_checkpoint = config.checkpoint.load
        previous = adapter_run_config(c.save) if c.save else None
        if previous is not None:  # the same command again: resume
            check_base(previous["base"], base_checkpoint, c.save)
            config = _with_saved_peft(config, previous, c.save)
            resume = c.save
            steps.append(f"--save {c.save} holds adapters of this base: resuming them")
    targets = resolve_targets(config.peft.target_names(),
                              _hf_names(read_run_config(base_checkpoint)))
    record = base_record(base_load, base_checkpoint)
    return config, PeftPlan(base_checkpoint, resume, targets, record)


def read_run_config(root: str) -> dict:
    """The run config of the checkpoint in ``root``: its JSON, or for a Megatron-LLM legacy
    checkpoint its pickled arguments (read with torch)."""
    run_config = run_config_of(root)
    if run_config is None:
        from megatron_ext.checkpointing.sources import read_run_config as read_any

        return read_any(root)
    return run_config


def _with_saved_peft(config: TrainConfig, saved: dict, where: str) -> TrainConfig:
    """The adapter settings of the checkpoint in ``where``; the command's must agree."""
    settings = saved["peft"]
    mine = config.peft
    if mine.enabled:
        ours = mine.settings(resolve_targets(mine.target_names(), _hf_names(saved)))
        differ = [f"{key}: checkpoint {settings.get(key)!r}, this run {value!r}"
                  for key, value in ours.items() if settings.get(key) != value]
        if differ:
            raise CheckpointError(f"{where} holds adapters with other settings ("
                                  + "; ".join(differ) + "); use the same --peft flags, or "
                                  "another --save for new adapters")
    return dataclasses.replace(config, peft=PeftArgs.from_settings(settings))


def _hf_names(run_config: dict):
    family = get_family((run_config.get("model") or {}).get("model_name") or "llama2")
    return family.hf.linear_names if family.hf is not None else None


def _own_tokenizer(tokenizer, own):
    """``tokenizer`` (the flags) with the file, type and id layout of a checkpoint's own
    tokenizer ``own`` (a TokenizerConfig); the flags' extra tokens are kept."""
    return dataclasses.replace(tokenizer, tokenizer_type=own.tokenizer_type,
                               vocab_file=own.vocab_file,
                               megatron_llm_specials=own.megatron_llm_specials)


def _with_imported_model(config: TrainConfig, importer: Importer,
                         steps: list[str]) -> TrainConfig:
    """``--load`` of a Hugging Face model or GGUF file: its import in the cache (made now
    when missing), loaded as weights only with the model's shape; its tokenizer unless
    ``--vocab_file`` names one."""
    c, tokenizer = config.checkpoint, config.tokenizer
    path, run_config = importer(c, tokenizer)
    if not tokenizer.vocab_file:
        tokenizer = _own_tokenizer(tokenizer, tokenizer_config_from_run(path, run_config))
    steps.append(f"--load {c.load} is a model to import: its import {path} (weights only, "
                 "its shape" + ("" if config.tokenizer.vocab_file else ", its tokenizer") + ")")
    return dataclasses.replace(config, tokenizer=tokenizer, checkpoint=dataclasses.replace(
        c, load=path, finetune=True, use_checkpoint_args=True))


def _with_auto_resume(config: TrainConfig, steps: list[str]) -> TrainConfig:
    """``--auto_resume``: a checkpoint in ``--save`` replaces ``--load`` (a full resume:
    optimizer, schedule, data position); without one, ``--load`` as given. (LoRA/DoRA
    runs always resume their adapters from ``--save``.)"""
    c = config.checkpoint
    if not c.auto_resume or not c.save or latest_iteration(c.save) is None:
        return config
    if c.load and os.path.abspath(c.load) == os.path.abspath(c.save):
        return config
    steps.append(f"--auto_resume: {c.save} holds a checkpoint; resuming from it instead of "
                 f"--load {c.load}")
    return dataclasses.replace(config, checkpoint=dataclasses.replace(
        c, load=c.save, finetune=False, use_checkpoint_args=True))


def _with_checkpoint_model_args(config: TrainConfig, steps: list[str]) -> TrainConfig:
    """``--use_checkpoint_args``: the model shape saved with the checkpoint in ``--load``."""
    load, save = config.checkpoint.load, config.checkpoint.save
    if (os.path.abspath(load) == os.path.abspath(save or "")
            and (not os.path.isdir(load) or latest_iteration(load) is None)):
        steps.append("--use_checkpoint_args: --save has no checkpoint yet (first launch); the "
                     "command line gives the model's shape")
        return config
    return with_saved_model(config, read_run_config(load)["model"])


def with_saved_model(config: TrainConfig, saved: dict) -> TrainConfig:
    """``config`` with the model settings ``saved`` with a checkpoint (a run config's
    ``model``), as ``--use_checkpoint_args`` reads them."""
    # the sample length stays this run's: it is a data setting, not the model's
    return config.with_model(ModelArgs.from_dict(
        {k: v for k, v in saved.items() if k != "seq_length"}, base=config.model))
