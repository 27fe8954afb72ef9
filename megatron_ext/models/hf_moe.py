"""The Hugging Face layout of mixture-of-experts families on the Llama layout (Mixtral,
Qwen3-MoE): attention, norms and embeddings as :mod:`hf_llama`, the MLP a router and
experts.

Why one module: the MoE families differ in the names of their experts' tensors on disk
and in a few config fields; the conversion is the same. Expert tensor names:

* on disk (Hub checkpoints, and what ``save_pretrained`` of transformers 5 writes), one
  tensor per expert: Mixtral ``block_sparse_moe.experts.E.w1`` (gate), ``w3`` (up),
  ``w2`` (down) and ``block_sparse_moe.gate`` (the router); Qwen3-MoE
  ``mlp.experts.E.gate_proj`` / ``up_proj`` / ``down_proj`` and ``mlp.gate``;
* in memory in transformers 5, stacked: ``mlp.experts.gate_up_proj`` ``[E, 2F, H]``
  (gate rows first, as our ``linear_fc1``) and ``mlp.experts.down_proj`` ``[E, H, F]``,
  router ``mlp.gate``. :func:`experts_to_megatron` reads either.

megatron-core (unsharded, TP=EP=1 names): ``mlp.router.weight`` and
``mlp.experts.local_experts.E.linear_fc1.weight`` (``[gate; up]``) / ``linear_fc2``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.hf_llama import (
    LINEAR_NAMES,
    LlamaLikeHF,
    hf_layer_names,
    layer_from_megatron,
    layer_to_megatron,
    linear_rows_from_megatron,
    model_args_from_llama_config,
)

if TYPE_CHECKING:
    import torch

    from megatron_ext.models.config import ModelArgs

OURS = "mlp.experts.local_experts.{}."  # an expert's module in a megatron-core layer
_OUR_EXPERT = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class ExpertNames:
    """Where a family keeps its MoE block in a HF layer (on disk)."""

    block: str  # "block_sparse_moe" (Mixtral) | "mlp"
    gate: str  # the expert's gate projection: "w1" | "gate_proj"
    up: str  # "w3" | "up_proj"
    down: str  # "w2" | "down_proj"

    def router(self) -> str:
        return f"{self.block}.gate.weight"

    def expert(self, expert: int) -> tuple[str, str, str]:
        prefix = f"{self.block}.experts.{expert}."
        return (prefix + self.gate + ".weight", prefix + self.up + ".weight",
                prefix + self.down + ".weight")


MIXTRAL_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2")
QWEN_MOE_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")


def experts_to_megatron(hf: Mapping[str, "torch.Tensor"], layer: int, names: ExpertNames,
                        num_experts: int) -> dict[str, "torch.Tensor"]:
    """One layer's router and experts in megatron-core names, from the on-disk per-expert
    tensors or transformers 5's stacked in-memory ones (``mlp.experts.gate_up_proj``)."""
    import torch

    src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    stacked = src + "mlp.experts.gate_up_proj"
    router = hf[src + names.router()] if src + names.router() in hf else hf[
        src + "mlp.gate.weight"]
    out = {dst + "mlp.router.weight": router}
    for expert in range(num_experts):
        ours = dst + OURS.format(expert)
        if stacked in hf:
            fc1 = hf[stacked][expert]
            fc2 = hf[src + "mlp.experts.down_proj"][expert]
        else:
            gate, up, down = (hf[src + name] for name in names.expert(expert))
            fc1, fc2 = torch.cat([gate, up], dim=0), down
        out[ours + "linear_fc1.weight"] = fc1
        out[ours + "linear_fc2.weight"] = fc2
    return out


def experts_from_megatron(state: Mapping[str, "torch.Tensor"], layer: int,
                          names: ExpertNames) -> dict[str, "torch.Tensor"]:
    """Inverse of :func:`experts_to_megatron`, in the on-disk per-expert names."""
    src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    out = {dst + names.router(): state[src + "mlp.router.weight"]}
    for expert in range(count_experts(state, layer)):
        ours = src + OURS.format(expert)
        gate, up = state[ours + "linear_fc1.weight"].chunk(2, dim=0)
        for name, tensor in zip(names.expert(expert),
                                (gate, up, state[ours + "linear_fc2.weight"])):
            out[dst + name] = tensor
    return {key: value.contiguous() for key, value in out.items()}


def count_experts(state: Mapping[str, Any], layer: int) -> int:
    """The experts of ``layer`` in a megatron-core (unsharded) state."""
    prefix = f"decoder.layers.{layer}."
    found = {int(match.group(1)) for key in state if key.startswith(prefix)
             for match in [_OUR_EXPERT.match(key)] if match}
    return 1 + max(found) if found else 0


def config_experts(config: Mapping[str, Any], experts_key: str) -> Optional[int]:
    """The number of experts in an HF config: ``experts_key``, or transformers 5's own name
    for it (it writes Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""
    experts = config.get(experts_key) or config.get("num_local_experts")
    return int(experts) if experts else None


def moe_config_fields(config: Mapping[str, Any], source: str, experts_key: str,
                      ffn_key: str) -> dict:
    """``ModelArgs`` MoE fields of an HF config (``experts_key``: its number of experts,
    ``ffn_key``: each expert's width)."""
    experts = config_experts(config, experts_key)
    if not experts:
        raise UnsupportedModelError(f"{source}: {experts_key} is not set (a mixture of "
                                    "experts without experts)")
    if float(config.get("router_jitter_noise") or 0.0):
        raise UnsupportedModelError(f"{source}: router_jitter_noise "
                                    f"{config['router_jitter_noise']} (not built)")
    return {"num_experts": int(experts),
            "moe_router_topk": int(config.get("num_experts_per_tok", 2)),
            "moe_ffn_hidden_size": int(config[ffn_key])}


@dataclass(frozen=True)
class MoELlamaLikeHF(LlamaLikeHF):
    """:class:`LlamaLikeHF` whose MLPs are mixtures of experts: ``names`` of the experts on
    disk, ``experts_key``/``ffn_key`` the config's fields for their number and width;
    ``num_experts`` is bound to a model by :meth:`for_config` (what the importer reads)."""

    names: ExpertNames = MIXTRAL_NAMES
    experts_key: str = "num_local_experts"
    ffn_key: str = "intermediate_size"
    num_experts: int = 0

    def for_config(self, config: Mapping[str, Any]) -> "MoELlamaLikeHF":
        return dataclasses.replace(self,
                                   num_experts=config_experts(config, self.experts_key) or 0)

    @property
    def linear_names(self) -> Mapping[str, tuple[str, ...]]:
        """Attention as in the Llama layout; ``linear_fc1``/``linear_fc2`` stand for every
        expert's (their adapters: one per expert)."""
        experts = f"{self.names.block}.experts."
        return {**{key: value for key, value in LINEAR_NAMES.items()
                   if key.startswith("self_")},
                "mlp.linear_fc1": (experts + self.names.gate, experts + self.names.up),
                "mlp.linear_fc2": (experts + self.names.down,)}

    def linear_rows_from_megatron(self, module: str, rows: "torch.Tensor", num_heads: int,
                                  num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        return linear_rows_from_megatron(module, rows, num_heads, num_kv_heads)

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        args = model_args_from_llama_config(config, model_name, source, self.windowed,
                                            self.qkv_bias, self.qk_norm)
        return {**args, **moe_config_fields(config, source, self.experts_key, self.ffn_key)}

    def hf_config(self, args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
                  eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
                  max_position_embeddings: Optional[int] = None) -> dict:
        if not args.num_experts:
            raise UnsupportedModelError(f"the {args.model_name} model has no experts "
                                        "(--num_experts): the Hugging Face "
                                        f"{self.model_type} layout is a mixture of experts")
        dense = dataclasses.replace(args, num_experts=None, moe_ffn_hidden_size=None)
        config = super().hf_config(dense, vocab_size, bos_token_id, eos_token_id,
                                   pad_token_id, torch_dtype, max_position_embeddings)
        config.update({self.experts_key: args.num_experts,
                       "num_experts_per_tok": args.moe_router_topk,
                       self.ffn_key: args.moe_ffn_hidden_size,
                       "router_jitter_noise": 0.0, "output_router_logits": False})
        return config

    def layer_names(self, layer: int) -> list[str]:
        dense = hf_layer_names(layer, self.qkv_bias, self.qk_norm)
        names = [name for name in dense if ".mlp." not in name]
        prefix = f"model.layers.{layer}."
        names.append(prefix + self.names.router())
        for expert in range(self.num_experts):
            names += [prefix + name for name in self.names.expert(expert)]
        return names

    def layer_to_megatron(self, hf: Mapping[str, "torch.Tensor"], layer: int, num_heads: int,
                          num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        out = layer_to_megatron(hf, layer, num_heads, num_kv_heads, self.qkv_bias,
                                self.qk_norm, mlp=False)
        experts = self.num_experts or _stacked_experts(hf, layer)
        return {**out, **experts_to_megatron(hf, layer, self.names, experts)}

    def layer_from_megatron(self, state: Mapping[str, "torch.Tensor"], layer: int,
                            num_heads: int, num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        out = layer_from_megatron(state, layer, num_heads, num_kv_heads, self.qkv_bias,
                                  self.qk_norm, mlp=False)
        return {**out, **experts_from_megatron(state, layer, self.names)}


def _stacked_experts(hf: Mapping[str, Any], layer: int) -> int:
    stacked = hf.get(f"model.layers.{layer}.mlp.experts.gate_up_proj")
    return 0 if stacked is None else int(stacked.shape[0])
