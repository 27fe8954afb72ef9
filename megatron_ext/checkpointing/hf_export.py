"""Any project checkpoint -> a Hugging Face directory ``transformers`` loads as it is.

Why streamed: the checkpoint is read a layer at a time (whatever TP/PP wrote
it) and written as safetensors shards with an index, so export needs about
one layer of memory. The vocabulary padding is dropped; the tokenizer is
exported with the same ids as ours (added special tokens included), a chat
template equal to the data's chat format, and a generation config that stops
at the format's end-of-turn token.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.checkpointing.dcp import COMMON, consolidated_weights, hf_backend_checkpoint
from megatron_ext.checkpointing.hf_import import DTYPES
from megatron_ext.checkpointing.hf_tokenizer import (
    chat_template,
    export_hf_tokenizer,
    generation_config_eos,
)
from megatron_ext.checkpointing.options import ExportConfig  # (lives there: no torch)
from megatron_ext.checkpointing.run_config import (
    chat_settings_of_run,
    default_chat_format,
    load_run_config,
    tokenizer_config_from_run,
)
from megatron_ext.checkpointing.sources import open_checkpoint
from megatron_ext.checkpointing.tracker import iteration_dir
from megatron_ext.errors import CheckpointError, ConfigError, TokenizerError
from megatron_ext.io import read_json, staged_directory, write_json
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.models.hf_config import export_adapter, hf_config_from_model_args
from megatron_ext.safetensors_io import ShardedSafetensorsWriter
from megatron_ext.tokenizers import GENERATION_CONFIG, build_tokenizer

logger = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


HF_BACKEND = "dcp (hf backend)"  # ExportSummary.source of a Hugging Face backend checkpoint
DTYPE_FLAGS = {DTYPE_NAMES[dtype]: flag for flag, dtype in DTYPES.items()}  # "bfloat16": "bf16"


def export_dtype(requested: Optional[str], run_config: dict) -> str:
    """The dtype to export in: ``requested`` (``--dtype``) when given, else the precision the
    checkpoint was trained in, else the dtype its weights were imported in, else fp32.

    Why not a fixed bf16: an fp32 model (a tiny test model, a CPU finetune) must round-trip
    bit-exact without flags, and a bf16 model gains nothing from being widened."""
    if requested:
        return requested
    precision = run_config.get("precision")
    if precision:  # a trainer's run config
        return PrecisionArgs(bf16=bool(precision.get("bf16")),
                             fp16=bool(precision.get("fp16"))).dtype_name
    return DTYPE_FLAGS.get((run_config.get("source") or {}).get("stored_dtype"), "fp32")


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_hf` wrote."""

    out: str
    source: str  # dist | unsharded | legacy
    iteration: int
    layers: int
    vocab_size: int
    padded_rows: int  # embedding rows in the checkpoint, padding included
    dtype: str
    chat_format: Optional[str]
    eos_ids: list[int]
    bytes: int
    tokenizer: dict  # the tokenizer export's own summary
    seconds: float


def export_hf(config: ExportConfig, tokenizer_files: bool = True) -> ExportSummary:
    """Write the HF directory; returns a summary. Nothing is left at ``out`` on failure.

    ``tokenizer_files=False``: the model only (config, generation config, weights), for a
    PEFT adapter's base whose tokenizer travels with the adapter."""
    from megatron_ext.cli import ProgressBar

    start = time.perf_counter()
    native = hf_backend_checkpoint(config.load) if config.base is None else None
    if native is not None and config.iteration is not None:
        native = iteration_dir(config.load, config.iteration)
    if native is not None:
        return _export_hf_backend(config, native, tokenizer_files, start)
    source = open_checkpoint(config.load, config.iteration, config.base)
    model = source.run_config.get("model")
    if not model:
        raise CheckpointError(f"{source.path}: its run config has no model arguments")
    tokenizer_home = source.base.path if source.base is not None else config.load
    tokenizer, chat_format, template, eos_ids = _export_tokenizer(
        config, source.run_config, tokenizer_home, tokenizer_files)
    dtype = DTYPES[export_dtype(config.dtype, source.run_config)]
    heads = model["num_attention_heads"]
    kv = model.get("num_attention_heads_kv") or heads
    args = ModelArgs.from_dict(model).resolved()
    adapter = export_adapter(args.model_name)
    hf_config = hf_config_from_model_args(
        model, tokenizer.vocab_size, tokenizer.bos_id,
        eos_ids[0] if len(eos_ids) == 1 else eos_ids, tokenizer.pad_id, DTYPE_NAMES[dtype])

    with staged_directory(config.out, config.overwrite) as staging:
        # config and tokenizer first: a tokenizer that cannot be exported exactly fails
        # before hours of weight writing, not after
        write_json(os.path.join(staging, "config.json"), hf_config)
        tokenizer_info = _write_generation_and_tokenizer(staging, tokenizer, eos_ids,
                                                         chat_format, template, tokenizer_files)
        writer = ShardedSafetensorsWriter(staging, "model", config.max_shard_bytes)
        groups, first = weight_groups(source, tokenizer, config.load)
        rows = first["embedding.word_embeddings.weight"].shape[0]
        for name, tensor in adapter.embeddings_from_megatron(
                first, tokenizer.vocab_size, tied=args.tie_embeddings).items():
            writer.add(name, tensor.to(dtype))
        del first
        layers = 0
        bar = ProgressBar(total=model["num_layers"], desc="exporting layers", unit="layer",
                       enabled=config.progress)
        for group in bar.wrap(groups):
            try:
                converted = adapter.layer_from_megatron(group, layers, heads, kv)
            except KeyError as exc:
                raise CheckpointError(f"{config.load}: layer {layers} lacks {exc.args[0]} "
                                      "(an incomplete or foreign checkpoint)") from None
            for name, tensor in converted.items():
                writer.add(name, tensor.to(dtype))
            layers += 1
        if layers != model["num_layers"]:
            raise CheckpointError(f"{config.load}: {layers} layers found, the run config says "
                                  f"{model['num_layers']}")
        writer.finish()
    return ExportSummary(out=config.out, source=source.kind, iteration=source.iteration,
                         layers=layers, vocab_size=tokenizer.vocab_size, padded_rows=rows,
                         dtype=DTYPE_NAMES[dtype], chat_format=chat_format, eos_ids=eos_ids,
                         bytes=writer.total_bytes, tokenizer=tokenizer_info,
                         seconds=time.perf_counter() - start)


def _export_tokenizer(config: ExportConfig, run_config: dict, home: str,
                      tokenizer_files: bool):
    """(tokenizer, chat format, prompt template, end-of-turn ids) an export writes."""
    tokenizer = build_tokenizer(tokenizer_config_from_run(home, run_config, config.vocab_file))
    chat_format, template = (usable_chat_format(config.chat_format, config.prompt_template,
                                                 run_config, tokenizer)
                             if tokenizer_files else (None, None))
    return tokenizer, chat_format, template, generation_config_eos(tokenizer, chat_format,
                                                                   template)


def _write_generation_and_tokenizer(staging: str, tokenizer, eos_ids: list[int],
                                    chat_format: Optional[str], template: Optional[str],
                                    tokenizer_files: bool) -> dict:
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids,
                  "pad_token_id": tokenizer.pad_id, "do_sample": False}
    write_json(os.path.join(staging, GENERATION_CONFIG), generation)
    return (export_hf_tokenizer(tokenizer, chat_format, staging, template)
            if tokenizer_files else {})


def _export_hf_backend(config: ExportConfig, directory: str, tokenizer_files: bool,
                       start: float) -> ExportSummary:
    """Export a checkpoint of the Hugging Face backend (``checkpointing/dcp.py``): its
    weights consolidated under transformers' own names, its model's config.json (every
    embedding row the model trained with kept), the tokenizer and generation config as
    for any other export; a model with code of its own keeps its Python files."""
    import shutil

    run_config = load_run_config(directory)
    common = read_json(os.path.join(directory, COMMON), CheckpointError)
    tokenizer, chat_format, template, eos_ids = _export_tokenizer(
        config, run_config, directory, tokenizer_files)
    dtype = DTYPES[export_dtype(config.dtype, run_config)]
    model = run_config["hf_model"]
    hf_config = {**model["config"], "dtype": DTYPE_NAMES[dtype], "bos_token_id": tokenizer.bos_id,
                 "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
                 "pad_token_id": tokenizer.pad_id, "use_cache": True}
    hf_config.pop("torch_dtype", None)
    weights = (consolidated_weights(directory) if "base" not in run_config else
               trained_model(directory, run_config).state_dict())
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" in weights:
        del weights["lm_head.weight"]  # transformers ties it to the input embeddings
    rows = next(t.shape[0] for n, t in weights.items() if n.endswith("embed_tokens.weight"))
    if rows < tokenizer.vocab_size:
        raise CheckpointError(f"{config.load} has {rows} embedding rows but its tokenizer "
                              f"{tokenizer.vocab_size} tokens: wrong --vocab_file?")
    with staged_directory(config.out, config.overwrite) as staging:
        write_json(os.path.join(staging, "config.json"), hf_config)
        tokenizer_info = _write_generation_and_tokenizer(staging, tokenizer, eos_ids,
                                                         chat_format, template, tokenizer_files)
        source = model["path"]
        if hf_config.get("auto_map") and os.path.isdir(source):
            for name in os.listdir(source):
                if name.endswith(".py"):
                    shutil.copy2(os.path.join(source, name), staging)
        writer = ShardedSafetensorsWriter(staging, "model", config.max_shard_bytes)
        for name, tensor in weights.items():
            writer.add(name, tensor.to(dtype))
        writer.finish()
    return ExportSummary(out=config.out, source=HF_BACKEND,
                         iteration=int(common["iteration"]),
                         layers=int(hf_config.get("num_hidden_layers") or 0),
                         vocab_size=tokenizer.vocab_size, padded_rows=rows,
                         dtype=DTYPE_NAMES[dtype], chat_format=chat_format, eos_ids=eos_ids,
                         bytes=writer.total_bytes, tokenizer=tokenizer_info,
                         seconds=time.perf_counter() - start)


def adapted_model(directory: str, run_config: dict):
    """The peft model of an adapter checkpoint of the hf backend: its base model as it
    trained (``from_pretrained``), with the trained adapters."""
    from megatron_ext.hf_native.model import add_adapters, load_model
    from megatron_ext.peft.config import PeftArgs

    settings = run_config["peft"]
    base = load_model(run_config["base"]["load"], torch.float32,
                      (run_config.get("backend") or {}).get("trust_remote_code", False),
                      int(run_config["hf_model"]["config"].get("vocab_size") or 0))
    model, _ = add_adapters(base, PeftArgs.from_settings(settings), 0)
    adapters = consolidated_weights(directory)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    if unexpected or any("lora_" in name for name in missing):
        raise CheckpointError(f"{directory}: its adapters do not fit the base "
                              f"{run_config['base']['load']} ({len(unexpected)} unexpected, "
                              f"{sum('lora_' in n for n in missing)} missing)")
    return model


def trained_model(directory: str, run_config: dict):
    """The transformers model a checkpoint of the hf backend holds, in fp32 on the CPU:
    its base model built from the recorded config with the saved weights, or (adapters)
    the base with the trained adapters folded in."""
    if "base" in run_config:
        return adapted_model(directory, run_config).merge_and_unload()
    from megatron_ext.hf_native.model import build_empty_model, materialize

    model = build_empty_model(run_config["hf_model"]["config"], torch.float32,
                              (run_config.get("backend") or {}).get("trust_remote_code", False))
    materialize(model, torch.device("cpu"))
    weights = consolidated_weights(directory)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: its weights do not fit its model "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
    return model.eval()


def export_hf_backend_adapter(config: ExportConfig) -> str:
    """``--adapter_only`` of an adapter checkpoint of the hf backend: peft's own layout
    (``adapter_config.json`` + ``adapter_model.safetensors``, written by peft) and the
    tokenizer. Returns the checkpoint directory exported."""
    directory = hf_backend_checkpoint(config.load)
    if config.iteration is not None:
        directory = iteration_dir(config.load, config.iteration)
    run_config = load_run_config(directory)
    if "base" not in run_config:  # (adapter checkpoints record their base)
        raise CheckpointError(f"{config.load} holds a whole model, not adapters: export it "
                              "without --adapter_only")
    tokenizer, chat_format, template, eos_ids = _export_tokenizer(config, run_config,
                                                                  directory, True)
    model = adapted_model(directory, run_config)
    with staged_directory(config.out, config.overwrite) as staging:
        model.save_pretrained(staging)
        _write_generation_and_tokenizer(staging, tokenizer, eos_ids, chat_format, template,
                                        True)
    return directory


def weight_groups(source, tokenizer, load: str):
    """The checkpoint's weight groups (an iterator) and the first one (the embeddings),
    checked to have a row for every token of ``tokenizer``: an export whose vocabulary
    outgrows its embeddings would write a model that indexes past them."""
    groups = source.groups(include_optimizer=False)
    first = next(groups)
    rows = first["embedding.word_embeddings.weight"].shape[0]
    if rows < tokenizer.vocab_size:
        raise CheckpointError(f"{load} has {rows} embedding rows but its tokenizer "
                              f"{tokenizer.vocab_size} tokens: wrong --vocab_file?")
    return groups, first


def usable_chat_format(requested: Optional[str], template: Optional[str], run_config: dict,
                        tokenizer) -> tuple[Optional[str], Optional[str]]:
    """(chat format, prompt template) to export: as asked; else the data's (or chatml)
    when an exact chat template exists for it; else none (no chat template written)."""
    if requested == "none":
        return None, None
    if requested:
        name = requested
    else:
        name, saved_template = chat_settings_of_run(run_config)
        template = template or saved_template
        if name is None:
            name = default_chat_format(tokenizer)
            logger.warning("the training data's chat format is unknown (an imported model, or "
                           "its -meta.json is not found from here): trying %s; pass "
                           "--chat_format to choose", name)
    try:
        chat_template(name, tokenizer, template)  # raises when it cannot be exact
    except (TokenizerError, ConfigError) as exc:
        if requested:
            raise
        logger.warning("no chat template written: %s", exc)
        return None, None
    return name, template
