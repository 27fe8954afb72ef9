"""Megatron-LLM's ``args`` namespace <-> our ``ModelArgs`` fields.

Why: a legacy checkpoint records its architecture only in Megatron-LLM's
argument names and defaults (see the package docstring); reading one must
recover our family and every model argument, and writing one must produce the
arguments Megatron-LLM's loader and tools read.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import torch

from megatron_ext.checkpointing.legacy.unpickling import LegacyObject
from megatron_ext.checkpointing.tracker import Iteration
from megatron_ext.errors import CheckpointError
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import closest_family, families, family_for_legacy_name
from megatron_ext.models.family import Family

_POSITION_ENUM = {1: "rotary", 2: "absolute"}  # megatron.model.enums.PositionEmbeddingType
_OUR_NAME_ARG = "megatron_ext_model_name"  # ignored by Megatron-LLM; keeps llama3 apart from llama2


def _model_args_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ModelArgs))


def resolve_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``ModelArgs`` field, explicit: missing keys take ``ModelArgs``'s
    defaults, ``None`` takes the family's.

    Why: a checkpoint must record the architecture itself, not "the default of
    the version that wrote it". The sliding window stays ``None`` for families
    without one and becomes ``0`` ("none") for a family whose default has one.
    """
    unknown = sorted(set(model_args) - set(_model_args_fields()))
    if unknown:
        raise CheckpointError(f"unknown model argument(s) {', '.join(unknown)}; expected "
                              f"ModelArgs fields ({', '.join(_model_args_fields())})")
    family = family_named(model_args.get("model_name", ModelArgs.model_name))
    model = ModelArgs(**model_args).resolved()
    resolved = asdict(model)
    problems = []
    if resolved.get("rope_scaling_factor"):
        problems.append("Llama 3.1-style RoPE scaling (rope_scaling_factor "
                        f"{resolved['rope_scaling_factor']})")
    if family.add_qkv_bias or family.qk_layernorm:
        problems.append(f"the {family.name} family's "
                        + ("query/key/value biases" if family.add_qkv_bias
                           else "query/key norms"))
    problems += model.settings.legacy_problems(model)  # the family's own settings
    if model.num_experts:
        problems.append(f"a mixture of {model.num_experts} experts")
    if resolved["kv_channels"] * resolved["num_attention_heads"] != resolved["hidden_size"]:
        problems.append(f"a head size (kv_channels {resolved['kv_channels']}) other than "
                        "hidden size / heads")
    if resolved["tie_embeddings"] != family.tie_embeddings:
        # Megatron-LLM's Llama-family models assert untied embeddings, its GPT tied ones
        problems.append(f"{'tied' if resolved['tie_embeddings'] else 'untied'} embeddings in "
                        f"the {family.name} family (Megatron-LLM's {family.legacy_name} "
                        f"requires tie_embed_logits={family.tie_embeddings})")
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}: no Megatron-LLM equivalent, this model "
                              "cannot be written in the legacy layout (use the dist or "
                              "unsharded checkpoint forms, or export to Hugging Face)")
    return resolved


def family_named(name: str) -> Family:
    known = families()
    if name not in known:
        raise CheckpointError(f"unknown model family {name!r}: choose one of "
                              f"{', '.join(known)}")
    return known[name]


def _enum_name(value: Any, table: Mapping[int, str]) -> Any:
    """Name of an enum member whether pickled as a string, a real enum or a stand-in."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, LegacyObject):
        return table.get(value.args[0]) if value.args else None
    return value


def _architecture(args: Mapping[str, Any]) -> dict[str, Any]:
    """What a Megatron-LLM ``args`` says about the network, Megatron-LLM defaults applied."""
    get = args.get
    upstream = [name for name, bad in (
        ("swiglu", get("swiglu")), ("normalization", get("normalization") == "RMSNorm"),
        ("group_query_attention", get("group_query_attention")),
        ("use_rotary_position_embeddings", get("use_rotary_position_embeddings")),
        ("untie_embeddings_and_output_weights", get("untie_embeddings_and_output_weights")))
        if bad]
    if upstream:
        raise CheckpointError(
            f"this looks like an upstream Megatron-LM checkpoint (args {', '.join(upstream)}); "
            "its rotary and SwiGLU conventions differ from Megatron-LLM's and are not supported "
            "here: convert it to Hugging Face format with Megatron-LM's tools first")
    refused = [f"{name}={get(name)!r}" for name in (
        "use_post_ln", "apply_residual_connection_post_layernorm",
        "standalone_embedding_stage") if get(name)]
    if get("parallel_layernorm") and not get("parallel_attn"):
        refused.append("parallel_layernorm=True without parallel_attn")
    if get("rope_scaling_factor", 1.0) not in (None, 1.0):
        refused.append(f"rope_scaling_factor={get('rope_scaling_factor')!r}")
    if get("num_layers_per_virtual_pipeline_stage") is not None:
        refused.append("num_layers_per_virtual_pipeline_stage="
                       f"{get('num_layers_per_virtual_pipeline_stage')!r}")
    glu = get("glu_activation")
    if glu not in (None, "swiglu"):
        refused.append(f"glu_activation={glu!r}")
    position = _enum_name(get("position_embedding_type", "absolute"), _POSITION_ENUM)
    if position not in ("rotary", "absolute", "learned_absolute"):
        refused.append(f"position_embedding_type={position!r}")
    if refused:
        raise CheckpointError("the checkpoint's architecture cannot be represented by our "
                              f"megatron-core models ({', '.join(refused)})")
    missing = [name for name in ("hidden_size", "num_attention_heads") if get(name) is None]
    num_layers = get("num_layers") or get("encoder_num_layers")
    if num_layers is None:
        missing.append("num_layers")
    if missing:
        raise CheckpointError(f"the checkpoint's args lack {', '.join(missing)}")
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_channels = get("kv_channels")
    if kv_channels is not None and kv_channels * heads != hidden:
        raise CheckpointError(f"kv_channels={kv_channels} with {heads} heads does not equal "
                              f"hidden_size={hidden}; our models need head_dim = hidden/heads")
    seq_length = get("seq_length") or get("encoder_seq_length") or get("max_position_embeddings")
    if seq_length is None:
        raise CheckpointError("the checkpoint's args give neither seq_length nor "
                              "max_position_embeddings")
    return {
        "num_layers": int(num_layers), "hidden_size": hidden, "num_attention_heads": heads,
        "num_attention_heads_kv": int(get("num_attention_heads_kv") or heads),
        "ffn_hidden_size": int(get("ffn_hidden_size") or 4 * hidden),
        "seq_length": int(seq_length),
        "max_position_embeddings": int(get("max_position_embeddings") or seq_length),
        "rope_theta": float(get("rope_theta") or 10000.0),
        "layernorm_epsilon": float(get("layernorm_epsilon") or 1e-5),
        "sliding_window_size": get("sliding_window_size"),
        "init_method_std": float(get("init_method_std") or 0.02),
        "make_vocab_size_divisible_by": int(get("make_vocab_size_divisible_by") or 128),
        "normalization": "RMSNorm" if get("use_rms_norm") else "LayerNorm",
        "swiglu": glu == "swiglu",
        "position_embedding": "rope" if position == "rotary" else "learned_absolute",
        "tie_embeddings": bool(get("tie_embed_logits", True)),
        "use_bias": bool(get("use_bias", False)),
        # parallel attention and MLP (Falcon); the family's settings read the rest
        "parallel_attn": bool(get("parallel_attn")),
    }


def _guess_family(arch: Mapping[str, Any]) -> str | None:
    """The family whose defaults describe ``arch`` best (ties: the default family)."""
    structure = {key: arch[key] for key in ("normalization", "swiglu", "position_embedding",
                                            "tie_embeddings")}
    family = closest_family(structure, arch["rope_theta"], arch["layernorm_epsilon"],
                            bool(arch["sliding_window_size"]), prefer=ModelArgs.model_name,
                            parallel=arch["parallel_attn"])
    return family.name if family else None


def legacy_args_to_model_args(args: Mapping[str, Any],
                              model_name: str | None = None) -> dict[str, Any]:
    """Our resolved ``ModelArgs`` fields for a Megatron-LLM ``args`` dict.

    The family is ``model_name``, else the one we recorded when writing, else
    Megatron-LLM's ``model_name`` (when we know it), else guessed from the
    architecture (``hf_to_megatron.py`` records no name). Any disagreement
    between the family and the architecture the args describe is refused.
    """
    arch = _architecture(args)
    name = (model_name or args.get(_OUR_NAME_ARG)
            or getattr(family_for_legacy_name(args.get("model_name")), "name", None)
            or _guess_family(arch))
    if name is None:
        raise CheckpointError(
            f"the checkpoint's architecture ({arch['normalization']}, "
            f"{'SwiGLU' if arch['swiglu'] else 'GeLU'}, {arch['position_embedding']} positions, "
            f"{'tied' if arch['tie_embeddings'] else 'untied'} embeddings; model_name="
            f"{args.get('model_name')!r}) matches none of our families ({', '.join(families())})")
    family = family_named(name)
    wanted = {"normalization": family.normalization, "swiglu": family.swiglu,
              "position_embedding": family.position_embedding,
              "tie_embeddings": family.tie_embeddings}
    clash = [f"{key}: checkpoint {arch[key]!r}, {name} {value!r}"
             for key, value in wanted.items() if arch[key] != value]
    if arch["parallel_attn"] != family.parallel_layers:
        clash.append(f"parallel_attn: checkpoint {arch['parallel_attn']}, {name} "
                     f"{family.parallel_layers}")
    if clash:
        raise CheckpointError(f"the checkpoint does not have the {name} architecture "
                              f"({'; '.join(clash)})")
    window = arch["sliding_window_size"]
    out = {key: arch[key] for key in _model_args_fields() if key in arch}
    out.update(model_name=name,
               sliding_window_size=int(window) if window else (0 if family.sliding_window
                                                               else None),
               **family.settings.from_legacy_args(args))
    return resolve_model_args(out)


_STRUCTURAL_ARGS = (
    "num_layers", "encoder_num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_attention_heads_kv", "kv_channels", "seq_length", "encoder_seq_length",
    "max_position_embeddings", "padded_vocab_size", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
    "virtual_pipeline_model_parallel_size", "position_embedding_type", "use_rms_norm", "use_bias",
    "glu_activation", "tie_embed_logits", "rope_theta", "rope_scaling_factor",
    "layernorm_epsilon", "sliding_window_size", "parallel_attn", "parallel_layernorm",
    "use_post_ln", "apply_residual_connection_post_layernorm", "standalone_embedding_stage",
    "params_dtype", "fp16", "bf16", "iteration", _OUR_NAME_ARG)


def model_args_to_legacy_args(model_args: Mapping[str, Any], tp: int, pp: int,
                              padded_vocab_size: int, iteration: Iteration,
                              params_dtype: torch.dtype,
                              extra_args: Mapping[str, Any] | None = None
                              ) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LLM's loader and tools read, for our model.

    Only plain Python values and a ``torch.dtype`` go in (position embedding
    type as the string Megatron-LLM's ``validate_args`` converts), so the file
    unpickles without our code. ``extra_args`` adds or overrides the
    non-architectural fields (``tokenizer_type``, ``vocab_file``,
    ``consumed_train_samples``...); changing an architectural one is refused.
    """
    resolved = resolve_model_args(model_args)
    family = family_named(resolved["model_name"])
    model = ModelArgs(**resolved)
    settings_args = model.settings.legacy_args(model)  # the family's own settings
    hidden, heads = resolved["hidden_size"], resolved["num_attention_heads"]
    values: dict[str, Any] = {
        "num_layers": resolved["num_layers"], "encoder_num_layers": resolved["num_layers"],
        "hidden_size": hidden, "ffn_hidden_size": resolved["ffn_hidden_size"],
        "num_attention_heads": heads,
        "num_attention_heads_kv": resolved["num_attention_heads_kv"],
        "kv_channels": hidden // heads,
        "seq_length": resolved["seq_length"], "encoder_seq_length": resolved["seq_length"],
        "max_position_embeddings": resolved["max_position_embeddings"],
        "padded_vocab_size": padded_vocab_size,
        "make_vocab_size_divisible_by": resolved["make_vocab_size_divisible_by"],
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "num_layers_per_virtual_pipeline_stage": None,
        "virtual_pipeline_model_parallel_size": None,
        "model_name": family.legacy_name, _OUR_NAME_ARG: family.name,
        "position_embedding_type": "rotary" if family.position_embedding == "rope"
        else "absolute",
        "use_rms_norm": family.normalization == "RMSNorm",
        "use_bias": resolved["add_bias_linear"],
        "glu_activation": "swiglu" if family.swiglu else None,
        "tie_embed_logits": resolved["tie_embeddings"],
        "rope_theta": float(resolved["rope_theta"]), "rope_scaling_factor": 1.0,
        "layernorm_epsilon": float(resolved["layernorm_epsilon"]),
        "sliding_window_size": resolved["sliding_window_size"] or None,
        "parallel_attn": family.parallel_layers, "parallel_layernorm": False,
        "use_post_ln": False,
        "apply_residual_connection_post_layernorm": False,
        "standalone_embedding_stage": False,
        # exact GeLU, as megatron-core's F.gelu (the fused kernel is the tanh approximation)
        "bias_gelu_fusion": False, "bias_dropout_fusion": False, "bias_droput_fusion": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "lima_dropout": False,
        "params_dtype": params_dtype, "fp16": params_dtype == torch.float16,
        "bf16": params_dtype == torch.bfloat16,
        "init_method_std": resolved["init_method_std"],
        "tokenizer_type": "SentencePieceTokenizer",
        "iteration": iteration, "consumed_train_samples": 0, "consumed_valid_samples": 0,
        "data_parallel_random_init": False,
        **settings_args,
    }
    for key, value in (extra_args or {}).items():
        if (key in _STRUCTURAL_ARGS or key in settings_args) and values.get(key) != value:
            raise CheckpointError(f"extra_args cannot change {key} ({values.get(key)!r} -> "
                                  f"{value!r}): it follows from the model and layout")
        values[key] = value
    return argparse.Namespace(**values)

