"""Read and write the per-rank checkpoint layout of Megatron-LLM (old Megatron-LM).

Why: users arrive with checkpoints trained or converted by epfLLM's
Megatron-LLM (``weights_conversion/hf_to_megatron.py``, ``finetune.py``) and
may want to hand our models back to it. Our models are megatron-core
``GPTModel``s whose *unsharded* weights (TP=1/PP=1 megatron-core names, see
:mod:`megatron_ext.models.hf_llama`) are the exchange format; this module
translates between that and Megatron-LLM's files, merging or splitting tensor-
and pipeline-parallel shards.

What Megatron-LLM writes (read from github.com/epfLLM/Megatron-LLM, commit
806a833; paraphrased, file references in brackets):

Files [megatron/checkpointing.py: get_checkpoint_name, save_checkpoint,
read_metadata]
    ``ROOT/latest_checkpointed_iteration.txt`` holds an iteration number or
    ``release``. Weights are in ``ROOT/iter_{n:07d}/`` (or ``ROOT/release/``),
    one file per model-parallel rank: ``mp_rank_{tp:02d}/model_optim_rng.pt``
    when PP=1, ``mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt`` when PP>1.
    With ``--use_distributed_optimizer`` the model file is ``model_rng.pt`` and
    the optimizer lives in separate ``..._{dp:03d}/optim.pt`` directories (we
    read the model file and ignore those). Each file is a ``torch.save``'d dict:
    ``args`` (the run's ``argparse.Namespace``), ``checkpoint_version`` (3.0),
    ``iteration`` (int, or the string ``"release"``), ``model`` (below) and,
    from training runs, ``optimizer``, ``opt_param_scheduler``, ``rng_state``.
    A virtual-pipeline run stores ``model0``, ``model1``... (refused here).

``model`` [megatron/model/gpt_model.py, language_model.py: state_dict_for_save_checkpoint]
    ``{'language_model': {'embedding': {'word_embeddings': {'weight'}, 'position_embeddings':
    {'weight'}}, 'encoder': {flat transformer keys}, 'lm_head': <tensor>}}``.
    ``position_embeddings`` exists only for absolute positions; ``lm_head``
    (a bare tensor, not a dict) only when ``tie_embed_logits`` is false. When
    embeddings are tied and PP>1, the last stage also carries a replica of its
    vocabulary shard as ``model['word_embeddings_for_head'] = {'weight'}``.
    Older layouts still accepted by its loader (and by ours): encoder under
    ``transformer`` with ``.attention.`` instead of ``.self_attention.``, and a
    flat ``embedding['word_embeddings.weight']`` -- exactly what
    ``hf_to_megatron.py`` writes.

Encoder keys [megatron/model/transformer.py: ParallelTransformer(Layer), ParallelAttention, ParallelMLP]
    ``layers.{i}.input_layernorm.weight`` (+``.bias`` for LayerNorm),
    ``layers.{i}.self_attention.query_key_value.weight``/``.bias``,
    ``layers.{i}.self_attention.dense.weight``/``.bias``,
    ``layers.{i}.post_attention_layernorm.weight`` (+``.bias``),
    ``layers.{i}.mlp.dense_h_to_4h.weight``/``.bias``,
    ``layers.{i}.mlp.dense_4h_to_h.weight``/``.bias``, and on the last stage
    ``final_layernorm.weight`` (+``.bias``). Linear biases exist only with
    ``--use_bias`` (default off); RMSNorm has no bias. ``i`` restarts at 0 on
    every pipeline stage: stage ``p`` holds global layers
    ``[p*L/PP, (p+1)*L/PP)`` (``_get_num_layers`` requires ``L % PP == 0``);
    the embedding lives on stage 0, final norm and ``lm_head`` on the last.

Tensor parallelism [tools/checkpoint_loader_megatron.py, checkpoint_saver_megatron.py]
    Column-parallel (rows split, dim 0): word embeddings and ``lm_head``
    (vocabulary rows), ``query_key_value`` weight and bias, ``dense_h_to_4h``
    weight and bias. Row-parallel (dim 1): ``dense`` and ``dense_4h_to_h``
    weights; their biases, all norms and position embeddings are replicated.

QKV rows [transformer.py ParallelAttention.forward; hf_to_megatron.py rearrange_qkv]
    Grouped per key/value head, like megatron-core: for each of the
    ``num_attention_heads_kv`` groups, its query heads, then its key head,
    then its value head (the view ``[.., groups, q_per_kv + 2, head_dim]``).
    TP ranks get whole groups, so heads and kv heads must divide by TP.

Rotary [megatron/model/positional_embeddings.py; weights_conversion/utils/permute_qkv.py]
    Megatron-LLM applies Meta's complex rotary: dimensions ``(2j, 2j+1)`` of a
    head form one rotated pair at frequency ``theta**(-2j/d)``.
    megatron-core (``rotary_interleaved=False``, our setting) pairs ``(j,
    j+d/2)`` at the same frequency (rotate-half, as in HF). So every query and
    key head's rows are permuted: Megatron-LLM row ``2j+a`` is our row
    ``a*d/2 + j`` -- ``permute_qkv`` (HF to Megatron-LLM) and its
    ``revert=True`` (Megatron-LLM to HF) do this; value rows are untouched.
    Attention scores are identical after the permutation (tested).

SwiGLU [megatron/model/glu_activations.py; tools/checkpoint_loader_megatron.py]
    ``dense_h_to_4h`` output is chunked ``x1, x2`` and activated as
    ``x1 * silu(x2)``: rows are ``[up; gate]`` (``w3; w1`` in Meta's names),
    the *reverse* of megatron-core's ``[gate; up]``. Each TP rank holds
    ``[up_r; gate_r]`` of its slice, not a contiguous slice of the full matrix.

Arguments [megatron/checkpointing.py: load_args_from_checkpoint, check_checkpoint_args;
tools/checkpoint_loader_megatron.py; megatron/arguments.py]
    Copied from the checkpoint by ``--use_checkpoint_args`` and the tools:
    ``num_layers, hidden_size, ffn_hidden_size, seq_length,
    num_attention_heads, num_attention_heads_kv, kv_channels,
    max_position_embeddings, tokenizer_type, padded_vocab_size,
    position_embedding_type ('rotary'|'absolute', a string or its enum),
    use_rms_norm, glu_activation, tie_embed_logits, parallel_attn,
    parallel_layernorm, make_vocab_size_divisible_by, sliding_window_size,
    tensor_model_parallel_size, pipeline_model_parallel_size, bias_gelu_fusion,
    bias_droput_fusion`` (sic); compared on a non-finetune load:
    ``num_layers, hidden_size, num_attention_heads`` and the TP/PP sizes; the
    converter additionally requires ``params_dtype`` and ``iteration``. Not
    copied (must be given on Megatron-LLM's command line): ``model_name``,
    ``use_bias``, ``rope_theta``, ``layernorm_epsilon``. Argparse defaults
    apply to fields a file lacks (``use_bias`` False, ``tie_embed_logits``
    True, ``num_attention_heads_kv`` = heads, ``ffn_hidden_size`` = 4h,
    ``rope_theta`` 1e4, ``layernorm_epsilon`` 1e-5).

Safety: legacy files are pickles (``args`` is a Namespace, possibly holding
Megatron-LLM enum objects), so they are loaded with ``weights_only=False``,
which can run code embedded in the file: load only checkpoints you trust.
Classes of modules this environment lacks (``megatron.model.enums``...) are
replaced by inert stand-ins (:class:`LegacyObject`) instead of failing.

Not represented (refused, never silently changed): Falcon's parallel
attention/layernorm, post-LN, residual-after-norm, rotary scaling, GLUs other
than SwiGLU, ``kv_channels != hidden/heads``, virtual pipelines, a standalone
embedding stage, upstream Megatron-LM's rotary/SwiGLU conventions.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import pickle
import re
import shutil
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Self

import torch

from megatron_ext.checkpointing import TRACKER, CheckpointError, write_tracker
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import (
    closest_family,
    families,
    family_for_legacy_name,
)
from megatron_ext.models.family import Family

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
DISTRIBUTED_OPTIMIZER_MODEL_FILE = "model_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")

Iteration = int | Literal["release"]

# our megatron-core layer names <-> Megatron-LLM layer names (weight/bias suffix appended)
_LAYER_NAMES = (
    ("input_layernorm", "input_layernorm"),
    ("self_attention.linear_qkv", "self_attention.query_key_value"),
    ("self_attention.linear_proj", "self_attention.dense"),
    ("pre_mlp_layernorm", "post_attention_layernorm"),
    ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
    ("mlp.linear_fc2", "mlp.dense_4h_to_h"),
)
_NORMS = ("input_layernorm", "post_attention_layernorm")
_POSITION_ENUM = {1: "rotary", 2: "absolute"}  # megatron.model.enums.PositionEmbeddingType
_OUR_NAME_ARG = "megatron_ext_model_name"  # ignored by Megatron-LLM; keeps llama3 apart from llama2


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


# ---------------------------------------------------------------------------
# unpickling files written by a code base we do not have


class LegacyObject:
    """Inert stand-in for a class a legacy pickle names but this environment lacks.

    Why: a Megatron-LLM ``args`` namespace holds e.g.
    ``megatron.model.enums.PositionEmbeddingType.rotary``; megatron-core has no
    ``megatron.model``, so plain unpickling fails. Enum members arrive as
    ``cls(value)`` (kept in ``args``), other objects as ``__new__`` plus
    ``__setstate__`` (kept in ``state``).
    """

    legacy_module = ""
    legacy_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<legacy {self.legacy_module}.{self.legacy_name} args={self.args!r}>"


_STAND_INS: dict[tuple[str, str], type] = {}


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in _STAND_INS:
                logger.debug("legacy checkpoint names %s.%s, which is not importable here: "
                             "using an inert stand-in", module, name)
                _STAND_INS[key] = type(name, (LegacyObject,),
                                       {"legacy_module": module, "legacy_name": name})
            return _STAND_INS[key]


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("megatron_ext_legacy_pickle")
    module.__dict__.update({name: getattr(pickle, name) for name in dir(pickle)
                            if not name.startswith("__")})
    module.Unpickler = _LenientUnpickler
    module.load = lambda file, **kw: _LenientUnpickler(file, **kw).load()
    return module


def load_legacy_file(path: str) -> dict:
    """``torch.load`` one rank file on CPU; a missing or damaged file is a CheckpointError.

    Trusted files only: this is a full (``weights_only=False``) unpickle.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"legacy checkpoint file {path} is missing (every tensor- and "
                              "pipeline-parallel rank needs its file)")
    try:
        try:  # memory-mapped: tensors are read when used, not all at once
            loaded = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_pickle_module(), mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=False,  # pre-zip format
                                pickle_module=_pickle_module())
    except Exception as exc:  # noqa: BLE001 -- zip errors, EOFError, UnpicklingError...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"legacy checkpoint file {path} cannot be loaded "
                              f"({type(exc).__name__}: {detail}); it is truncated or corrupt, "
                              "copy it again from the source") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a Megatron "
                              "checkpoint dict")
    return loaded


# ---------------------------------------------------------------------------
# args <-> ModelArgs


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
    _family(model_args.get("model_name", ModelArgs.model_name))
    resolved = asdict(ModelArgs(**model_args).resolved())
    if resolved.get("rope_scaling_factor"):
        raise CheckpointError("Llama 3.1-style RoPE scaling (rope_scaling_factor "
                              f"{resolved['rope_scaling_factor']}) has no Megatron-LLM "
                              "equivalent: this model cannot be written in the legacy layout")
    return resolved


def _family(name: str) -> Family:
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
        "parallel_attn", "parallel_layernorm", "use_post_ln",
        "apply_residual_connection_post_layernorm", "standalone_embedding_stage") if get(name)]
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
    }


def _guess_family(arch: Mapping[str, Any]) -> str | None:
    """The family whose defaults describe ``arch`` best (ties: the default family)."""
    structure = {key: arch[key] for key in ("normalization", "swiglu", "position_embedding",
                                            "tie_embeddings")}
    family = closest_family(structure, arch["rope_theta"], arch["layernorm_epsilon"],
                            bool(arch["sliding_window_size"]), prefer=ModelArgs.model_name)
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
    family = _family(name)
    wanted = {"normalization": family.normalization, "swiglu": family.swiglu,
              "position_embedding": family.position_embedding,
              "tie_embeddings": family.tie_embeddings}
    clash = [f"{key}: checkpoint {arch[key]!r}, {name} {value!r}"
             for key, value in wanted.items() if arch[key] != value]
    if clash:
        raise CheckpointError(f"the checkpoint does not have the {name} architecture "
                              f"({'; '.join(clash)})")
    window = arch["sliding_window_size"]
    out = {key: arch[key] for key in _model_args_fields() if key in arch}
    out.update(model_name=name,
               sliding_window_size=int(window) if window else (0 if family.sliding_window
                                                               else None))
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
    family = _family(resolved["model_name"])
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
        "use_bias": family.add_bias_linear,
        "glu_activation": "swiglu" if family.swiglu else None,
        "tie_embed_logits": family.tie_embeddings,
        "rope_theta": float(resolved["rope_theta"]), "rope_scaling_factor": 1.0,
        "layernorm_epsilon": float(resolved["layernorm_epsilon"]),
        "sliding_window_size": resolved["sliding_window_size"] or None,
        "parallel_attn": False, "parallel_layernorm": False, "use_post_ln": False,
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
    }
    for key, value in (extra_args or {}).items():
        if key in _STRUCTURAL_ARGS and values.get(key) != value:
            raise CheckpointError(f"extra_args cannot change {key} ({values.get(key)!r} -> "
                                  f"{value!r}): it follows from the model and layout")
        values[key] = value
    return argparse.Namespace(**values)


# ---------------------------------------------------------------------------
# tensor layouts


def permute_rotary_rows(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                        to_interleaved: bool) -> torch.Tensor:
    """Reorder the query and key rows of a grouped QKV weight (or bias) between
    rotate-half (megatron-core, HF) and interleaved (Meta, Megatron-LLM) rotary.

    Why: both rotate the same pairs at the same frequencies, but rotate-half
    pairs dims ``(j, j+d/2)`` where interleaved pairs ``(2j, 2j+1)``; moving row
    ``a*d/2 + j`` to ``2j + a`` (``to_interleaved``) or back makes the two
    models compute identical attention. Value rows are not rotated, not moved.
    """
    per_group = num_heads // num_kv_heads
    rows = num_heads + 2 * num_kv_heads
    if qkv.shape[0] % rows:
        raise CheckpointError(f"query_key_value has {qkv.shape[0]} rows, not a multiple of "
                              f"{rows} heads (q + k + v)")
    head_dim = qkv.shape[0] // rows
    if head_dim % 2:
        raise CheckpointError(f"rotary needs an even head dimension, got {head_dim}")
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    rotated = grouped[:, :per_group + 1]  # the query heads and the key head of each group
    pairs = (2, head_dim // 2) if to_interleaved else (head_dim // 2, 2)
    rotated = rotated.reshape(num_kv_heads, per_group + 1, *pairs, *rest).transpose(2, 3)
    rotated = rotated.reshape(num_kv_heads, per_group + 1, head_dim, *rest)
    return torch.cat([rotated, grouped[:, per_group + 1:]], dim=1).reshape(qkv.shape)


@dataclass(frozen=True)
class _Layout:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rotary: bool
    swiglu: bool
    layernorm_bias: bool
    linear_bias: bool
    position_embeddings: bool
    tied: bool
    tp: int
    pp: int

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def stage_keys(self, stage: int) -> list[str]:
        """Canonical (flattened) Megatron-LLM keys one rank file of ``stage`` holds."""
        keys = []
        if stage == 0:
            keys.append("embedding.word_embeddings.weight")
            if self.position_embeddings:
                keys.append("embedding.position_embeddings.weight")
        for local in range(self.layers_per_stage):
            prefix = f"encoder.layers.{local}."
            for _, legacy in _LAYER_NAMES:
                keys.append(prefix + legacy + ".weight")
                if (self.layernorm_bias if legacy in _NORMS else self.linear_bias):
                    keys.append(prefix + legacy + ".bias")
        if stage == self.pp - 1:
            keys.append("encoder.final_layernorm.weight")
            if self.layernorm_bias:
                keys.append("encoder.final_layernorm.bias")
            if not self.tied:
                keys.append("lm_head")
            elif self.pp > 1:
                keys.append("word_embeddings_for_head.weight")
        return keys


def _layout(model_args: Mapping[str, Any], tp: int, pp: int, linear_bias: bool) -> _Layout:
    family = _family(model_args["model_name"])
    layout = _Layout(
        num_layers=model_args["num_layers"], num_heads=model_args["num_attention_heads"],
        num_kv_heads=model_args["num_attention_heads_kv"] or model_args["num_attention_heads"],
        rotary=family.position_embedding == "rope", swiglu=family.swiglu,
        layernorm_bias=family.normalization == "LayerNorm", linear_bias=linear_bias,
        position_embeddings=family.position_embedding == "learned_absolute",
        tied=family.tie_embeddings, tp=tp, pp=pp)
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP={tp} and PP={pp} must be at least 1")
    else:
        for what, count, label, by in (("attention heads", layout.num_heads, "TP", tp),
                                       ("key/value heads", layout.num_kv_heads, "TP", tp),
                                       ("layers", layout.num_layers, "PP", pp)):
            if count % by:
                problems.append(f"{count} {what} are not divisible by {label}={by}")
    if layout.num_heads % layout.num_kv_heads:
        problems.append(f"{layout.num_heads} heads are not a multiple of "
                        f"{layout.num_kv_heads} key/value heads")
    if model_args["hidden_size"] % layout.num_heads:
        problems.append(f"hidden size {model_args['hidden_size']} is not divisible by "
                        f"{layout.num_heads} heads")
    if problems:
        raise CheckpointError("invalid legacy layout: " + "; ".join(problems))
    return layout


def _split_kind(key: str) -> str:
    """How a canonical key is sharded over TP: rows, columns, glu (per-rank [up; gate]) or copy."""
    if key in ("embedding.word_embeddings.weight", "lm_head", "word_embeddings_for_head.weight"):
        return "rows"
    if ".self_attention.query_key_value." in key:
        return "rows"
    if ".mlp.dense_h_to_4h." in key:
        return "glu"  # resolved to rows when the model has no GLU
    if key.endswith((".self_attention.dense.weight", ".mlp.dense_4h_to_h.weight")):
        return "columns"
    return "copy"


def _our_key(key: str, offset: int) -> str:
    if key == "lm_head":
        return "output_layer.weight"
    if key.startswith("encoder.final_layernorm."):
        return "decoder." + key[len("encoder."):]
    if key.startswith("embedding."):
        return key
    match = _LAYER_KEY.match(key)
    assert match, key
    local, rest = int(match.group(1)), match.group(2)
    for ours, legacy in _LAYER_NAMES:
        if rest.startswith(legacy + "."):
            return f"decoder.layers.{local + offset}.{ours}{rest[len(legacy):]}"
    raise AssertionError(key)


def _check_shapes(state: Mapping[str, torch.Tensor], model_args: Mapping[str, Any],
                  layout: _Layout, where: str) -> None:
    """Every unsharded tensor has the shape ``model_args`` implies (else name the first few)."""
    hidden, ffn = model_args["hidden_size"], model_args["ffn_hidden_size"]
    head_dim = hidden // layout.num_heads
    qkv = (layout.num_heads + 2 * layout.num_kv_heads) * head_dim
    fc1 = ffn * (2 if layout.swiglu else 1)
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    per_layer = {"input_layernorm": ((hidden,), (hidden,)),
                 "self_attention.linear_qkv": ((qkv, hidden), (qkv,)),
                 "self_attention.linear_proj": ((hidden, hidden), (hidden,)),
                 "pre_mlp_layernorm": ((hidden,), (hidden,)),
                 "mlp.linear_fc1": ((fc1, hidden), (fc1,)),
                 "mlp.linear_fc2": ((hidden, ffn), (hidden,))}
    wanted = {"embedding.word_embeddings.weight": (vocab, hidden),
              "embedding.position_embeddings.weight": (model_args["max_position_embeddings"],
                                                       hidden),
              "decoder.final_layernorm.weight": (hidden,),
              "decoder.final_layernorm.bias": (hidden,), "output_layer.weight": (vocab, hidden)}
    for i in range(layout.num_layers):
        for name, (weight, bias) in per_layer.items():
            wanted[f"decoder.layers.{i}.{name}.weight"] = weight
            wanted[f"decoder.layers.{i}.{name}.bias"] = bias
    wrong = [f"{key} {tuple(tensor.shape)} (expected {wanted[key]})"
             for key, tensor in state.items() if key in wanted
             and tuple(tensor.shape) != wanted[key]]
    if wrong:
        raise CheckpointError(f"{where}: tensor shapes do not match the model arguments: "
                              + "; ".join(wrong[:4]))


# ---------------------------------------------------------------------------
# legacy -> megatron-core


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
                stage: int, layout: _Layout) -> None:
    local_layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, flat) if m}
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
    family = _family(model_args["model_name"])
    if linear_bias and not family.add_bias_linear:
        raise CheckpointError(f"{sources[0][0]} has linear biases but the {family.name} family "
                              "has none; they would be lost")
    layout = _layout(model_args, tp, pp, linear_bias)
    state: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        expected = layout.stage_keys(stage)
        for rank in range(tp):
            _check_keys(flats[stage][rank], expected, sources[stage][rank], stage, layout)
        for key in expected:
            parts = [flats[stage][rank][key] for rank in range(tp)]
            kind = _split_kind(key)
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
            state[_our_key(key, stage * layout.layers_per_stage)] = merged
    if family.add_bias_linear and not linear_bias:
        logger.info("the checkpoint has no linear biases; %s gets zero biases (same outputs)",
                    family.name)
        for i in range(layout.num_layers):
            for ours, _ in _LAYER_NAMES:
                if "linear" in ours:
                    weight = state[f"decoder.layers.{i}.{ours}.weight"]
                    state[f"decoder.layers.{i}.{ours}.bias"] = weight.new_zeros(weight.shape[0])
    _check_shapes(state, model_args, layout,
                  os.path.dirname(os.path.dirname(sources[0][0])) or "legacy checkpoint")
    return state


def _iteration_dirname(iteration: Iteration) -> str:
    if iteration == "release":
        return "release"
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration must be a non-negative int or 'release', "
                              f"got {iteration!r}")
    return f"iter_{iteration:07d}"


def read_legacy_tracker(root: str) -> Iteration:
    """The iteration ``ROOT/latest_checkpointed_iteration.txt`` names (int or ``'release'``)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"{tracker} is missing: {root} is not a Megatron checkpoint "
                              "directory (pass iteration= to read one anyway)")
    with open(tracker, encoding="utf-8") as handle:
        text = handle.read().strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}, expected an "
                              "iteration number or 'release')")
    return int(text)


def _rank_file(directory: str) -> str:
    for name in (MODEL_FILE, DISTRIBUTED_OPTIMIZER_MODEL_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return os.path.join(directory, MODEL_FILE)


def _rank_dir(directory: str, tp_rank: int, pp_rank: int, pipeline: bool) -> str:
    name = f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" if pipeline else f"mp_rank_{tp_rank:02d}"
    return os.path.join(directory, name)


def _scan_ranks(directory: str) -> tuple[int, int, bool]:
    """(TP, PP, pipeline-style names) from the rank directory names present."""
    plain, piped = [], []
    for name in os.listdir(directory):
        match = _RANK_DIR.match(name)
        if not match or not os.path.isdir(os.path.join(directory, name)):
            continue
        tp_rank, pp_rank = int(match.group(1)), match.group(2)
        if pp_rank is None:
            plain.append(tp_rank)
        else:
            files = set(os.listdir(os.path.join(directory, name)))
            if files == {"optim.pt"}:
                continue  # PP=1 distributed optimizer: mp_rank_XX_<dp rank>/optim.pt
            piped.append((tp_rank, int(pp_rank)))
    if plain:
        return max(plain) + 1, 1, False
    if piped:
        return max(t for t, _ in piped) + 1, max(p for _, p in piped) + 1, True
    raise CheckpointError(f"{directory} holds no mp_rank_XX or mp_rank_XX_YYY directories")


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
    directory = os.path.join(root, _iteration_dirname(iteration))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} does not exist (iteration {iteration!r} of {root})")
    seen_tp, seen_pp, pipeline = _scan_ranks(directory)
    first_path = _rank_file(_rank_dir(directory, 0, 0, pipeline))
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
    paths = [[_rank_file(_rank_dir(directory, t, p, pipeline)) for t in range(tp)]
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


# ---------------------------------------------------------------------------
# megatron-core -> legacy


def _expected_state_keys(layout: _Layout) -> list[str]:
    keys = ["embedding.word_embeddings.weight"]
    if layout.position_embeddings:
        keys.append("embedding.position_embeddings.weight")
    for i in range(layout.num_layers):
        for ours, legacy in _LAYER_NAMES:
            keys.append(f"decoder.layers.{i}.{ours}.weight")
            if layout.layernorm_bias if legacy in _NORMS else layout.linear_bias:
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
             pp: int) -> tuple[dict[str, torch.Tensor], _Layout, dict[str, Any]]:
    model_args = resolve_model_args(model_args)
    family = _family(model_args["model_name"])
    layout = _layout(model_args, tp, pp, family.add_bias_linear)
    weights = {key: value for key, value in state.items() if not key.endswith("._extra_state")}
    expected = _expected_state_keys(layout)
    missing = [key for key in expected if key not in weights]
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"the state does not match {family.name} with "
                              f"{layout.num_layers} layers (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]})")
    _check_shapes(weights, model_args, layout, "the state to write")
    return weights, layout, model_args


def _rank_model(weights: Mapping[str, torch.Tensor], layout: _Layout, stage: int,
                rank: int) -> dict[str, Any]:
    """The ``model`` dict of one Megatron-LLM rank file, built on its own (bounded memory)."""
    flat: dict[str, torch.Tensor] = {}
    offset = stage * layout.layers_per_stage
    for key in layout.stage_keys(stage):
        source = weights["embedding.word_embeddings.weight"] \
            if key == "word_embeddings_for_head.weight" else weights[_our_key(key, offset)]
        if layout.rotary and ".self_attention.query_key_value." in key:
            source = permute_rotary_rows(source, layout.num_heads, layout.num_kv_heads,
                                         to_interleaved=True)
        kind = _split_kind(key)
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


def _save(obj: Any, path: str) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


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
    ``ROOT/<iter>.incomplete`` and renamed; the tracker is replaced with
    ``os.replace``, so a crash never leaves a checkpoint that looks complete.
    """
    dirname = _iteration_dirname(iteration)
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
    final = os.path.join(root, dirname)
    staging = final + ".incomplete"
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for stage in range(pp):
            for rank in range(tp):
                directory = _rank_dir(staging, rank, stage, pp > 1)
                os.makedirs(directory)
                _save({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                       "iteration": iteration, "model": _rank_model(weights, layout, stage, rank)},
                      os.path.join(directory, MODEL_FILE))
        previous = final + ".previous"
        if os.path.isdir(final):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_tracker(root, iteration)
    shutil.rmtree(final + ".previous", ignore_errors=True)
    return final
