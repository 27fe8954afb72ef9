"""Merge a checkpoint into one unsharded file set, and split one into a target layout.

Why both directions through the unsharded form: every format the project
reads (dist, unsharded, legacy per-rank) streams into it layer by layer, and
every target (a ``dist_checkpointing`` run directory, legacy Megatron-LLM
per-rank files) is written from it, so N formats need N readers and N
writers, not N x N converters. Tensors are copied bit for bit; only
vocabulary *padding* rows change when a target TP needs another padding.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.checkpointing.legacy import write_legacy_checkpoint
from megatron_ext.checkpointing.options import ReshardConfig  # (lives there: no torch)
from megatron_ext.checkpointing.run_config import write_run_config
from megatron_ext.checkpointing.sources import CheckpointSource, open_checkpoint
from megatron_ext.checkpointing.tracker import iteration_dir, write_tracker
from megatron_ext.checkpointing.unsharded import (
    UnshardedWriter,
    _is_vocab_tensor,
    save_dist_from_tensors,
)
from megatron_ext.errors import CheckpointError
from megatron_ext.io import check_out_free, staged_directory
from megatron_ext.models.config import padded_vocab_size
from megatron_ext.parallel import ModelShape, ParallelArgs, init_distributed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSummary:
    """What :func:`merge` wrote."""

    out: str
    source: str  # dist | unsharded | legacy
    iteration: int
    tensors: int
    optimizer: bool  # optimizer state and training position included
    bytes: int
    seconds: float


@dataclass(frozen=True)
class SplitSummary:
    """What :func:`split` wrote."""

    out: str
    source: str
    format: str  # dist | legacy
    iteration: int
    tp: int
    pp: int
    tensors: int
    optimizer: bool
    vocab_rows: int  # embedding rows, padded for the target TP
    seconds: float


def _copy_tokenizer_dir(source: CheckpointSource, destination: str) -> None:
    if source.base is not None:  # adapters: the base model's tokenizer
        source = source.base
    tokenizer_dir = os.path.join(source.path, "tokenizer")
    if source.kind == "unsharded" and os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, os.path.join(destination, "tokenizer"))


def merge(config: ReshardConfig) -> MergeSummary:
    """Any checkpoint -> unsharded file set (with optimizer state when it has one)."""
    start = time.perf_counter()
    source = open_checkpoint(config.load, config.iteration, config.base)
    with_optimizer = config.include_optimizer and source.has_optimizer
    if config.include_optimizer and not source.has_optimizer:
        logger.info("%s holds no optimizer state: merging weights only", config.load)
    count = 0
    with UnshardedWriter(config.out, config.max_shard_bytes, config.overwrite) as writer:
        rows = None
        for group in source.groups(include_optimizer=with_optimizer):
            for name, tensor in group.items():
                if name == "embedding.word_embeddings.weight":
                    rows = tensor.shape[0]
                writer.add(name, tensor)
                count += 1
        _copy_tokenizer_dir(source, writer.staging)
        meta = {"iteration": source.iteration, "source": source.kind,
                "source_path": os.path.abspath(source.path), "vocab_rows": rows}
        common = source.common() if with_optimizer else None
        writer.finish(meta, source.run_config, common)
    return MergeSummary(out=config.out, source=source.kind, iteration=source.iteration,
                        tensors=count, optimizer=with_optimizer,
                        bytes=writer.tensors.total_bytes, seconds=time.perf_counter() - start)


def _validate_layout(model: dict, tp: int, pp: int) -> None:
    """The split's layout against the checkpoint's shape: the trainer's own rules
    (``ParallelArgs.problems``), so a split checkpoint is one the trainer can load."""
    if tp < 1 or pp < 1:
        raise CheckpointError("cannot split to this layout: --target_tp and --target_pp must "
                              "be >= 1")
    problems = ParallelArgs(tp, pp).problems(model=ModelShape.of(**model))
    if problems:
        raise CheckpointError("cannot split to this layout: " + "; ".join(problems))


def _target_rows(rows: int, vocab: Optional[int], model: dict, tp: int) -> int:
    """Rows for the target TP: unchanged when already padded for it (a multiple of
    ``make_vocab_size_divisible_by`` x TP, as the trainer pads), else padded up with zero
    rows. Never fewer: trained padding rows take part in the softmax."""
    multiple = int(model.get("make_vocab_size_divisible_by", 128)) * tp
    if rows % multiple == 0:
        return rows
    return padded_vocab_size(max(rows, vocab or 0), multiple // tp, tp)


def _adapt_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    keep = min(rows, tensor.shape[0])
    out[:keep] = tensor[:keep]
    return out


def split(config: ReshardConfig) -> SplitSummary:
    """Any checkpoint -> a ``dist_checkpointing`` run directory or legacy per-rank files."""
    start = time.perf_counter()
    if config.format not in ("dist", "legacy"):
        raise CheckpointError(f"--format {config.format!r}: use dist or legacy")
    check_out_free(os.path.abspath(config.out), config.overwrite)
    source = open_checkpoint(config.load, config.iteration, config.base)
    model = source.run_config.get("model") or {}
    if not model:
        raise CheckpointError(f"{source.path}: its run config has no model arguments")
    _validate_layout(model, config.target_tp, config.target_pp)
    with_optimizer = (config.include_optimizer and source.has_optimizer
                      and config.format == "dist")
    tensors: dict[str, torch.Tensor] = {}
    for group in source.groups(include_optimizer=with_optimizer):
        tensors.update(group)
    rows = tensors["embedding.word_embeddings.weight"].shape[0]
    vocab = source.vocab_size
    if vocab is not None and rows < vocab:
        raise CheckpointError(f"{config.load} has {rows} embedding rows but its tokenizer "
                              f"{vocab} tokens")
    target_rows = _target_rows(rows, vocab, model, config.target_tp)
    for name in [n for n in tensors if _is_vocab_tensor(n)]:
        tensors[name] = _adapt_rows(tensors[name], target_rows)
    run_config = dict(source.run_config)
    parallel = dict(run_config.get("parallel") or {})
    parallel.update(tensor_model_parallel_size=config.target_tp,
                    pipeline_model_parallel_size=config.target_pp)
    run_config["parallel"] = parallel
    with staged_directory(config.out, config.overwrite) as staging:
        if config.format == "legacy":
            tok = run_config.get("tokenizer") or {}
            extra = {k: tok[k] for k in ("tokenizer_type", "vocab_file", "vocab_extra_ids_list")
                     if tok.get(k)}
            write_legacy_checkpoint(staging, tensors, model, config.target_tp, config.target_pp,
                                    source.iteration, target_rows, extra_args=extra)
        else:
            _write_dist(source, tensors, staging, run_config, with_optimizer)
        _copy_tokenizer_dir(source, staging)
    return SplitSummary(out=config.out, source=source.kind, format=config.format,
                        iteration=source.iteration, tp=config.target_tp, pp=config.target_pp,
                        tensors=len(tensors), optimizer=with_optimizer, vocab_rows=target_rows,
                        seconds=time.perf_counter() - start)


def _ensure_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        init_distributed(1, 1, 1234)


def _write_dist(source: CheckpointSource, tensors: dict, staging: str, run_config: dict,
                with_optimizer: bool) -> None:
    _ensure_process_group()
    common = source.common() if with_optimizer else {}
    common = dict(common)
    saved = dict(common.get("common") or {})
    saved.setdefault("iteration", source.iteration)
    # no layout: RNG streams are not carried over, so any TP/PP resumes without them
    saved["layout"] = {"tp": None, "pp": None, "dp": None}
    saved["weights_only"] = not with_optimizer
    common["common"] = saved
    directory = iteration_dir(staging, source.iteration)
    os.makedirs(directory)
    save_dist_from_tensors(tensors, directory, common)
    write_run_config(directory, run_config)
    write_tracker(staging, source.iteration)
