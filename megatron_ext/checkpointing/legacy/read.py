"""Reading a legacy checkpoint at any TP/PP into one unsharded megatron-core state."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ext.checkpointing.legacy.args import (
    family_named,
    legacy_args_to_model_args,
    resolve_model_args,
)
from megatron_ext.checkpointing.legacy.files import (
    rank_dir,
    rank_file,
    read_legacy_tracker,
    scan_ranks,
)
from megatron_ext.checkpointing.legacy.tensors import (
    LAYER_KEY,
    LAYER_NAMES,
    RankLayout,
    check_shapes,
    our_key,
    permute_rotary_rows,
    rank_layout,
    split_kind,
)
from megatron_ext.checkpointing.legacy.unpickling import load_legacy_file
from megatron_ext.checkpointing.tracker import Iteration, iteration_dirname
from megatron_ext.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class LegacyCheckpoint:
    """A Megatron-LLM checkpoint, merged to one unsharded megatron-core state dict.

    ``model_args`` uses our ``ModelArgs`` field names with every family
    default resolved, so ``ModelArgs(**model_args)`` rebuilds the model.
    ``legacy_args`` is the checkpoint's own ``args`` namespace as a dict (for
    ``tokenizer_type``, ``vocab_file``, ``consumed_train_samples``...).
    """

    state: dict[str, torch.Tensor]
    model_args: dict[str, Any]
    iteration: Iteration
    padded_vocab_size: int
    tp: int
    pp: int
    legacy_args: dict[str, Any] = field(default_factory=dict)


def _flatten_model(model: Any, source: str) -> dict[str, torch.Tensor]:
    """One rank's ``model`` dict as canonical flat keys, old aliases normalised."""
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{source}: 'model' is a {type(model).__name__}, not a dict")
    extra = sorted(set(model) - {"language_model", "word_embeddings_for_head"})
    if extra or "language_model" not in model:
        raise CheckpointError(f"{source}: unsupported model entries {extra or 'no language_model'}"
                              " (only GPT-style language models can be read)")
    language_model = model["language_model"]
    extra = sorted(set(language_model) - {"embedding", "encoder", "transformer", "lm_head",
                                          "output_layer"})
    if extra:
        raise CheckpointError(f"{source}: unsupported language_model entries {extra} "
                              "(pooler, decoder and token types have no megatron-core GPT "
                              "counterpart)")
    flat: dict[str, Any] = {}
    for name, value in language_model.get("embedding", {}).items():
        if isinstance(value, Mapping):
            flat.update({f"embedding.{name}.{sub}": tensor for sub, tensor in value.items()})
        else:
            flat[f"embedding.{name}"] = value  # hf_to_megatron.py's flat 'word_embeddings.weight'
    encoder = language_model.get("encoder", language_model.get("transformer", {}))
    for name, value in encoder.items():
        flat["encoder." + name.replace(".attention.", ".self_attention.")] = value
    for name in ("lm_head", "output_layer"):
        head = language_model.get(name)
        if head is not None:
            flat["lm_head"] = head["weight"] if isinstance(head, Mapping) else head
    for name, value in model.get("word_embeddings_for_head", {}).items():
        flat[f"word_embeddings_for_head.{name}"] = value
    wrong = [key for key, value in flat.items() if not isinstance(value, torch.Tensor)]
    if wrong:
        raise CheckpointError(f"{source}: {wrong[:3]} are not tensors")
    return flat


def _check_keys(flat: Mapping[str, torch.Tensor], expected: Sequence[str], source: str,
                stage: int, layout: RankLayout) -> None:
    local_layers = {int(m.group(1)) for m in map(LAYER_KEY.match, flat) if m}
    if len(local_layers) != layout.layers_per_stage:
        raise CheckpointError(
            f"{source}: holds {len(local_layers)} layers but pipeline stage {stage} of "
            f"{layout.pp} should hold {layout.layers_per_stage} ({layout.num_layers} layers)")
    missing = [key for key in expected if key not in flat]
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the layout its args describe "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")


def _merge(key: str, shards: Sequence[torch.Tensor], kind: str,
           sources: Sequence[str]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in shards}
    if len(shapes) > 1:
        detail = ", ".join(f"{src}: {tuple(t.shape)}" for src, t in zip(sources, shards))
        raise CheckpointError(f"{key} has different shapes on the tensor-parallel ranks "
                              f"({detail}); the files do not belong to one checkpoint")
    if kind == "rows":
        return torch.cat(list(shards), dim=0)
    if kind == "columns":
        return torch.cat(list(shards), dim=1)
    if kind == "glu":  # rank r holds [up_r; gate_r]; ours is [gate; up]
        if shards[0].shape[0] % 2:
            raise CheckpointError(f"{key} has an odd number of rows ({shards[0].shape[0]}) "
                                  "on a SwiGLU model")
        ups, gates = zip(*(t.chunk(2, dim=0) for t in shards))
        return torch.cat(gates + ups, dim=0)
    first = shards[0]
    for src, other in zip(sources[1:], shards[1:]):
        if not torch.equal(first, other):
            diff = (first.float() - other.float()).abs().max().item()
            logger.warning("%s differs between %s and %s (max abs diff %.3g) although it is "
                           "replicated; keeping tensor-parallel rank 0's", key, sources[0], src,
                           diff)
    return first


def legacy_to_megatron_state(shards: Sequence[Sequence[Mapping[str, Any]]],
                             model_args: Mapping[str, Any],
                             sources: Sequence[Sequence[str]] | None = None
                             ) -> dict[str, torch.Tensor]:
    """Megatron-LLM rank ``model`` dicts (``shards[pp][tp]``) to our unsharded state.

    ``model_args`` are our (resolved) ``ModelArgs`` fields; ``sources`` name
    the files in errors. TP shards are concatenated along their split dim
    (SwiGLU halves regrouped), pipeline stages renumbered to global layers, q/k
    rows moved from interleaved to rotate-half rotary. A family with linear
    biases reading a checkpoint without them (Megatron-LLM's GPT default) gets
    zero biases: the same function. The reverse (biases our family lacks) is
    refused.
    """
    model_args = resolve_model_args(model_args)
    pp, tp = len(shards), (len(shards[0]) if shards else 0)
    if any(len(row) != tp for row in shards):
        raise CheckpointError("every pipeline stage needs the same number of tensor ranks")
    if sources is None:
        sources = [[f"pipeline stage {p}, tensor rank {t}" for t in range(tp)] for p in range(pp)]
    flats = [[_flatten_model(shards[p][t], sources[p][t]) for t in range(tp)] for p in range(pp)]
    linear_bias = "encoder.layers.0.self_attention.dense.bias" in flats[0][0]
    family = family_named(model_args["model_name"])
    if linear_bias and not family.add_bias_linear:
        raise CheckpointError(f"{sources[0][0]} has linear biases but the {family.name} family "
                              "has none; they would be lost")
    layout = rank_layout(model_args, tp, pp, linear_bias)
    state: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        expected = layout.stage_keys(stage)
        for rank in range(tp):
            _check_keys(flats[stage][rank], expected, sources[stage][rank], stage, layout)
        for key in expected:
            parts = [flats[stage][rank][key] for rank in range(tp)]
            kind = split_kind(key)
            if kind == "glu" and not layout.swiglu:
                kind = "rows"
            merged = _merge(key, parts, kind, sources[stage])
            if key == "word_embeddings_for_head.weight":
                embedding = state["embedding.word_embeddings.weight"]
                if not torch.equal(merged, embedding):
                    logger.warning("the last stage's copy of the tied word embeddings differs "
                                   "from the first stage's; keeping the first stage's")
                continue
            if layout.rotary and ".self_attention.query_key_value." in key:
                merged = permute_rotary_rows(merged, layout.num_heads, layout.num_kv_heads,
                                             to_interleaved=False)
            state[our_key(key, stage * layout.layers_per_stage)] = merged
    if family.add_bias_linear and not linear_bias:
        logger.info("the checkpoint has no linear biases; %s gets zero biases (same outputs)",
                    family.name)
        for i in range(layout.num_layers):
            for ours, _ in LAYER_NAMES:
                if "linear" in ours:
                    weight = state[f"decoder.layers.{i}.{ours}.weight"]
                    state[f"decoder.layers.{i}.{ours}.bias"] = weight.new_zeros(weight.shape[0])
    check_shapes(state, model_args, layout,
                  os.path.dirname(os.path.dirname(sources[0][0])) or "legacy checkpoint")
    return state



def read_legacy_checkpoint(root: str, iteration: Iteration | None = None,
                           model_name: str | None = None) -> LegacyCheckpoint:
    """Read a Megatron-LLM checkpoint at any TP/PP into one unsharded megatron-core state.

    ``iteration`` defaults to the tracker's; ``model_name`` forces our family
    (otherwise taken from the args, or recognised from the architecture).
    TP/PP come from the rank directories and the args together, so a missing
    rank is an error naming its file, never a silently smaller model. Files
    are unpickled in full: load only checkpoints you trust.
    """
    if iteration is None:
        iteration = read_legacy_tracker(root)
    directory = os.path.join(root, iteration_dirname(iteration))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} does not exist (iteration {iteration!r} of {root})")
    seen_tp, seen_pp, pipeline = scan_ranks(directory)
    first_path = rank_file(rank_dir(directory, 0, 0, pipeline))
    first = load_legacy_file(first_path)
    version = first.get("checkpoint_version", 0)
    if version < 2.0:
        raise CheckpointError(f"{first_path} has checkpoint_version {version}; versions before "
                              "2.0 order QKV differently and are not supported")
    if "args" not in first or not hasattr(first["args"], "__dict__"):
        raise CheckpointError(f"{first_path} has no 'args' namespace; the model shape cannot "
                              "be known")
    args = dict(vars(first["args"]))
    tp = int(args.get("tensor_model_parallel_size") or args.get("model_parallel_size") or seen_tp)
    pp = int(args.get("pipeline_model_parallel_size") or seen_pp)
    if seen_tp > tp or seen_pp > pp or (pp > 1) != pipeline:
        raise CheckpointError(
            f"{directory} has rank directories for TP={seen_tp}, PP={seen_pp} but its args say "
            f"TP={tp}, PP={pp}; the directory mixes checkpoints")
    model_args = legacy_args_to_model_args(args, model_name)
    paths = [[rank_file(rank_dir(directory, t, p, pipeline)) for t in range(tp)]
             for p in range(pp)]
    for row in paths:  # name every missing file before spending time loading the others
        for path in row:
            if not os.path.isfile(path):
                raise CheckpointError(f"legacy checkpoint file {path} is missing (TP={tp}, "
                                      f"PP={pp} needs {tp * pp} rank files)")
    shards: list[list[Any]] = []
    for p in range(pp):
        row = []
        for t in range(tp):
            loaded = first if (p, t) == (0, 0) else load_legacy_file(paths[p][t])
            if "model" not in loaded:
                hint = " (virtual pipeline: not supported)" if "model0" in loaded else ""
                raise CheckpointError(f"{paths[p][t]} has no 'model' entry{hint}")
            row.append(loaded["model"])
            del loaded
        shards.append(row)
    del first
    state = legacy_to_megatron_state(shards, model_args, paths)
    padded = state["embedding.word_embeddings.weight"].shape[0]
    if args.get("padded_vocab_size") not in (None, padded):
        raise CheckpointError(f"{directory}: the embeddings have {padded} rows but args say "
                              f"padded_vocab_size={args['padded_vocab_size']}")
    if model_args["model_name"] == "gpt" and args.get("bias_gelu_fusion") \
            and args.get("use_bias", False):
        logger.warning("the checkpoint was trained with bias_gelu_fusion (tanh-approximate "
                       "GeLU); our GPT uses exact GeLU, outputs differ slightly (~1e-3)")
    return LegacyCheckpoint(state=state, model_args=model_args, iteration=iteration,
                            padded_vocab_size=padded, tp=tp, pp=pp, legacy_args=args)

