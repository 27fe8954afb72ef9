"""Tensor layouts: which tensors a rank file holds, how each splits over TP, rotary rows.

Why: Megatron-LLM and megatron-core order the same weights differently
(interleaved vs rotate-half rotary rows, ``[up; gate]`` vs ``[gate; up]``,
per-stage layer numbers); the reader and the writer share these rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ext.checkpointing.legacy.args import family_named
from megatron_ext.errors import CheckpointError

LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# our megatron-core layer names <-> Megatron-LLM layer names (weight/bias suffix appended)
LAYER_NAMES = (
    ("input_layernorm", "input_layernorm"),
    ("self_attention.linear_qkv", "self_attention.query_key_value"),
    ("self_attention.linear_proj", "self_attention.dense"),
    ("pre_mlp_layernorm", "post_attention_layernorm"),
    ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
    ("mlp.linear_fc2", "mlp.dense_4h_to_h"),
)
# the MLP's norm of Falcon's parallel layers with two norms (Falcon-40B: parallel_layernorm)
MLP_NORM = ("pre_mlp_layernorm", "mlp_layernorm")
NORMS = ("input_layernorm", "post_attention_layernorm", "mlp_layernorm")


def layer_names(parallel_norms: int) -> tuple[tuple[str, str], ...]:
    """:data:`LAYER_NAMES` of a layer: sequential (0), or Falcon's parallel layer whose one
    norm feeds attention and MLP (1, no MLP norm) or which has an MLP norm of its own (2)."""
    if not parallel_norms:
        return LAYER_NAMES
    names = tuple(pair for pair in LAYER_NAMES if pair[0] != "pre_mlp_layernorm")
    return names + ((MLP_NORM,) if parallel_norms == 2 else ())


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
class RankLayout:
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
    parallel_norms: int = 0  # Falcon's parallel layers: their norms (1 or 2); 0 sequential

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    @property
    def layer_names(self) -> tuple[tuple[str, str], ...]:
        return layer_names(self.parallel_norms)

    def stage_keys(self, stage: int) -> list[str]:
        """Canonical (flattened) Megatron-LLM keys one rank file of ``stage`` holds."""
        keys = []
        if stage == 0:
            keys.append("embedding.word_embeddings.weight")
            if self.position_embeddings:
                keys.append("embedding.position_embeddings.weight")
        for local in range(self.layers_per_stage):
            prefix = f"encoder.layers.{local}."
            for _, legacy in self.layer_names:
                keys.append(prefix + legacy + ".weight")
                if (self.layernorm_bias if legacy in NORMS else self.linear_bias):
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


def rank_layout(model_args: Mapping[str, Any], tp: int, pp: int, linear_bias: bool) -> RankLayout:
    family = family_named(model_args["model_name"])
    layout = RankLayout(
        num_layers=model_args["num_layers"], num_heads=model_args["num_attention_heads"],
        num_kv_heads=model_args["num_attention_heads_kv"] or model_args["num_attention_heads"],
        rotary=family.position_embedding == "rope", swiglu=family.swiglu,
        layernorm_bias=family.normalization == "LayerNorm", linear_bias=linear_bias,
        position_embeddings=family.position_embedding == "learned_absolute",
        tied=bool(model_args.get("tie_embeddings", family.tie_embeddings)), tp=tp, pp=pp,
        parallel_norms=int(model_args.get("parallel_attn_norms") or 0))
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


def split_kind(key: str) -> str:
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


def our_key(key: str, offset: int) -> str:
    if key == "lm_head":
        return "output_layer.weight"
    if key.startswith("encoder.final_layernorm."):
        return "decoder." + key[len("encoder."):]
    if key.startswith("embedding."):
        return key
    match = LAYER_KEY.match(key)
    assert match, key
    local, rest = int(match.group(1)), match.group(2)
    for ours, legacy in LAYER_NAMES + (MLP_NORM,):
        if rest.startswith(legacy + "."):
            return f"decoder.layers.{local + offset}.{ours}{rest[len(legacy):]}"
    raise AssertionError(key)


def check_shapes(state: Mapping[str, torch.Tensor], model_args: Mapping[str, Any],
                  layout: RankLayout, where: str) -> None:
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

