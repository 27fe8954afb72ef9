"""Writing our unsharded state as a Megatron-LLM checkpoint at any TP/PP."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from megatron_ext.checkpointing.legacy.args import (
    family_named,
    model_args_to_legacy_args,
    resolve_model_args,
)
from megatron_ext.checkpointing.legacy.files import CHECKPOINT_VERSION, MODEL_FILE, rank_dir
from megatron_ext.checkpointing.legacy.tensors import (
    NORMS,
    RankLayout,
    check_shapes,
    our_key,
    permute_rotary_rows,
    rank_layout,
    split_kind,
)
from megatron_ext.checkpointing.tracker import Iteration, iteration_dirname, write_tracker
from megatron_ext.errors import CheckpointError
from megatron_ext.io import StagedDirectory, atomic_write


def _expected_state_keys(layout: RankLayout) -> list[str]:
    keys = ["embedding.word_embeddings.weight"]
    if layout.position_embeddings:
        keys.append("embedding.position_embeddings.weight")
    for i in range(layout.num_layers):
        for ours, legacy in layout.layer_names:
            keys.append(f"decoder.layers.{i}.{ours}.weight")
            if layout.layernorm_bias if legacy in NORMS else layout.linear_bias:
                keys.append(f"decoder.layers.{i}.{ours}.bias")
    keys.append("decoder.final_layernorm.weight")
    if layout.layernorm_bias:
        keys.append("decoder.final_layernorm.bias")
    if not layout.tied:
        keys.append("output_layer.weight")
    return keys


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` owning exactly its own storage: ``torch.save`` writes a view's whole storage."""
    if tensor.is_contiguous() and \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _rank_part(key: str, tensor: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s part of an unsharded tensor (Megatron-LLM's split)."""
    if kind == "copy":
        return _compact(tensor)
    dim = 1 if kind == "columns" else 0
    if tensor.shape[dim] % (2 * tp if kind == "glu" else tp):
        raise CheckpointError(f"{key} has {tensor.shape[dim]} {'columns' if dim else 'rows'}, "
                              f"not divisible across TP={tp}")
    if kind == "glu":  # ours [gate; up] -> rank r holds [up_r; gate_r]
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([up.chunk(tp, dim=0)[rank], gate.chunk(tp, dim=0)[rank]], dim=0)
    return _compact(tensor.chunk(tp, dim=dim)[rank])


def _prepare(state: Mapping[str, torch.Tensor], model_args: Mapping[str, Any], tp: int,
             pp: int) -> tuple[dict[str, torch.Tensor], RankLayout, dict[str, Any]]:
    model_args = resolve_model_args(model_args)
    family = family_named(model_args["model_name"])
    layout = rank_layout(model_args, tp, pp, family.add_bias_linear)
    weights = {key: value for key, value in state.items() if not key.endswith("._extra_state")}
    expected = _expected_state_keys(layout)
    missing = [key for key in expected if key not in weights]
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"the state does not match {family.name} with "
                              f"{layout.num_layers} layers (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]})")
    check_shapes(weights, model_args, layout, "the state to write")
    return weights, layout, model_args


def _rank_model(weights: Mapping[str, torch.Tensor], layout: RankLayout, stage: int,
                rank: int) -> dict[str, Any]:
    """The ``model`` dict of one Megatron-LLM rank file, built on its own (bounded memory)."""
    flat: dict[str, torch.Tensor] = {}
    offset = stage * layout.layers_per_stage
    for key in layout.stage_keys(stage):
        source = weights["embedding.word_embeddings.weight"] \
            if key == "word_embeddings_for_head.weight" else weights[our_key(key, offset)]
        if layout.rotary and ".self_attention.query_key_value." in key:
            source = permute_rotary_rows(source, layout.num_heads, layout.num_kv_heads,
                                         to_interleaved=True)
        kind = split_kind(key)
        if kind == "glu" and not layout.swiglu:
            kind = "rows"
        flat[key] = _rank_part(key, source, kind, layout.tp, rank)
    return _nest(flat)


def megatron_to_legacy_shards(state: Mapping[str, torch.Tensor], model_args: Mapping[str, Any],
                              tp: int, pp: int) -> list[list[dict[str, Any]]]:
    """Our unsharded state to Megatron-LLM ``model`` dicts, ``[pp][tp]`` (inverse of
    :func:`legacy_to_megatron_state`).

    The state must hold exactly the family's tensors with the shapes
    ``model_args`` imply (``_extra_state`` entries, megatron-core's FP8
    metadata with no Megatron-LLM counterpart, are skipped): anything else is
    refused rather than dropped.
    """
    weights, layout, _ = _prepare(state, model_args, tp, pp)
    return [[_rank_model(weights, layout, stage, rank) for rank in range(tp)]
            for stage in range(pp)]


def _nest(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Canonical flat keys to Megatron-LLM's nested ``model`` dict (its current key style)."""
    language_model: dict[str, Any] = {}
    model: dict[str, Any] = {"language_model": language_model}
    for key, tensor in flat.items():
        if key.startswith("embedding."):
            _, module, param = key.split(".")
            language_model.setdefault("embedding", {}).setdefault(module, {})[param] = tensor
        elif key.startswith("encoder."):
            language_model.setdefault("encoder", {})[key[len("encoder."):]] = tensor
        elif key == "lm_head":
            language_model["lm_head"] = tensor
        else:  # word_embeddings_for_head.weight
            model.setdefault("word_embeddings_for_head", {})["weight"] = tensor
    return model


def write_legacy_checkpoint(root: str, state: Mapping[str, torch.Tensor],
                            model_args: Mapping[str, Any], tp: int, pp: int,
                            iteration: Iteration, padded_vocab_size: int,
                            extra_args: Mapping[str, Any] | None = None) -> str:
    """Write our unsharded state as a Megatron-LLM checkpoint at TP=``tp``, PP=``pp``.

    Returns the iteration directory. Each rank file holds ``args``,
    ``checkpoint_version`` 3.0, ``iteration`` and ``model`` -- no optimizer
    and no RNG state: Megatron-LLM's optimizer state is apex's (FusedAdam
    moments and fp32 master copies indexed by position in its own flat
    parameter-group order), which megatron-core's distributed optimizer state
    cannot be mapped onto faithfully. Load it in Megatron-LLM with
    ``--finetune`` (or ``--no_load_optim --no_load_rng``; a ``release``
    iteration skips both by itself), and pass ``--model_name``,
    ``--rope_theta``, ``--layernorm_epsilon``, ``--use_bias`` and, for GeLU
    models, ``--no_bias_gelu_fusion`` on its command line: its loader does not
    take those from ``args``. Megatron-LLM unpickles with ``torch.load``'s
    default ``weights_only``, so it needs torch < 2.6 (as for its own files).

    Everything is converted and checked first, then written to
    ``ROOT/<iter>.incomplete`` and renamed; the tracker is replaced
    atomically, so a crash never leaves a checkpoint that looks complete.
    """
    dirname = iteration_dirname(iteration)
    weights, layout, model_args = _prepare(state, model_args, tp, pp)
    embedding = weights["embedding.word_embeddings.weight"]
    if embedding.shape[0] != padded_vocab_size:
        raise CheckpointError(f"the embeddings have {embedding.shape[0]} rows but "
                              f"padded_vocab_size={padded_vocab_size}")
    if padded_vocab_size % max(tp, 1):
        raise CheckpointError(f"padded vocabulary {padded_vocab_size} is not divisible by "
                              f"TP={tp}; pad it to a multiple of make_vocab_size_divisible_by*TP")
    args = model_args_to_legacy_args(model_args, tp, pp, padded_vocab_size, iteration,
                                     embedding.dtype, extra_args)
    os.makedirs(root, exist_ok=True)
    with StagedDirectory(os.path.join(root, dirname), overwrite=True) as staged:
        for stage in range(pp):
            for rank in range(tp):
                directory = rank_dir(staged.path, rank, stage, pp > 1)
                os.makedirs(directory)
                with atomic_write(os.path.join(directory, MODEL_FILE), "wb") as handle:
                    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                                "iteration": iteration,
                                "model": _rank_model(weights, layout, stage, rank)}, handle)
        staged.publish(on_published=lambda: write_tracker(root, iteration))
    return os.path.join(root, dirname)
