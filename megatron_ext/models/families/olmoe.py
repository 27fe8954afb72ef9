"""OLMoE: the Llama layout (RMSNorm epsilon 1e-5, SwiGLU, RoPE base 10000, no biases) with
an RMSNorm over the *whole* query and key projections (not per head, as Qwen3's) before
RoPE, and mixtures of 64 experts, 8 per token, their routing weights as the softmax gives
them (``norm_topk_prob`` false: megatron-core's ``moe_router_pre_softmax``).

Why a norm of its own (:func:`projection_norms`): megatron-core normalises queries and
keys per head, ``[s, b, heads, head size]``; OLMoE's norm spans all of a token's heads, so
under tensor parallelism its mean square sums over the TP ranks' heads (an all-reduce
with its gradient), and its weight is split over TP like the heads. ``clip_qkv`` is
refused on import (not built). Hugging Face names each expert's tensors on disk
(``mlp.experts.E.gate_proj/up_proj/down_proj``, as Qwen3-MoE).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Mapping

from megatron_ext.models.family import (
    LLAMA_LAYOUT,
    Family,
    FamilySettings,
    UnsupportedModelError,
)
from megatron_ext.models.hf_moe import QWEN_MOE_NAMES, MoELlamaLikeHF

if TYPE_CHECKING:
    from megatron_ext.models.config import ModelArgs


@functools.cache
def projection_norms():
    """(QueryNorm, KeyNorm): RMSNorms over a token's whole query (key) projection, built on
    first use (torch, megatron-core)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class ProjectionNorm(torch.nn.Module):
        """RMSNorm of ``[s, b, heads, head size]`` over its last two axes and the TP ranks'
        heads; weight ``[heads x head size]`` of this rank's heads."""

        heads_attribute = "num_attention_heads"

        def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
            super().__init__()
            tp = parallel_state.get_tensor_model_parallel_world_size()
            heads = getattr(config, self.heads_attribute) or config.num_attention_heads
            if heads % tp:
                raise ValueError(f"{heads} heads do not split over TP {tp}: OLMoE's "
                                 "projection norms need whole heads per rank")
            self.eps, self.heads, self.total = eps, heads // tp, heads * hidden_size
            self.weight = torch.nn.Parameter(torch.ones(self.heads * hidden_size,
                                                        dtype=config.params_dtype))
            self.weight.tensor_model_parallel = True
            self.weight.partition_dim = 0
            self.weight.partition_stride = 1
            self.weight.sequence_parallel = False  # each rank: all tokens, its heads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.distributed.nn.functional as dist_nn

            x32 = x.float()
            squares = x32.square().sum(dim=(-1, -2), keepdim=True)
            group = parallel_state.get_tensor_model_parallel_group()
            if torch.distributed.get_world_size(group) > 1:
                squares = dist_nn.all_reduce(squares, group=group)  # its gradient too
            normed = x32 * torch.rsqrt(squares / self.total + self.eps)
            return (normed * self.weight.float().view(self.heads, -1)).type_as(x)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            state = self.state_dict(prefix="", keep_vars=True)
            return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0},
                                                       sharded_offsets)

    class QueryNorm(ProjectionNorm):
        heads_attribute = "num_attention_heads"

    class KeyNorm(ProjectionNorm):
        heads_attribute = "num_query_groups"

    return QueryNorm, KeyNorm


def block_spec(config, init_seed: int, use_flash_attn: bool = False, model=None):
    """The shared seeded block with OLMoE's projection norms on queries and keys."""
    from megatron_ext.models.builder import layer_spec

    query_norm, key_norm = projection_norms()
    block = layer_spec(config, init_seed, use_flash_attn)
    specs = []
    for spec in block.layer_specs:
        attention = spec.submodules.self_attention
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, q_layernorm=query_norm, k_layernorm=key_norm))
        specs.append(dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=attention)))
    return dataclasses.replace(block, layer_specs=specs)


@dataclasses.dataclass(frozen=True)
class OlmoeHF(MoELlamaLikeHF):
    """OLMoE's Hugging Face layout: Qwen3-MoE's names, its own config fields."""

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        if config.get("clip_qkv") is not None:
            raise UnsupportedModelError(f"{source}: clip_qkv {config['clip_qkv']} (not built)")
        if config.get("norm_topk_prob"):
            raise UnsupportedModelError(f"{source}: norm_topk_prob true (OLMoE's routing "
                                        "weights are the softmax's as they are)")
        return super().model_args(config, model_name, source)

    def hf_config(self, args: "ModelArgs", *rest, **kwargs) -> dict:
        config = super().hf_config(args, *rest, **kwargs)
        config.pop("head_dim", None)  # OLMoE's heads are hidden / heads wide
        config.update(norm_topk_prob=False, clip_qkv=None)
        return config


@dataclasses.dataclass(frozen=True)
class Settings(FamilySettings):
    """No choices of its own; how OLMoE routes: the top-k of the softmax, not renormalised."""

    def transformer_config(self, model: "ModelArgs") -> dict:
        return {"moe_router_pre_softmax": True}


FAMILY = Family(
    name="olmoe",
    legacy_name="olmoe",  # Megatron-LLM has no mixture of experts: the legacy writer refuses it
    **LLAMA_LAYOUT,
    rope_theta=10000.0,
    layernorm_epsilon=1e-5,
    qk_layernorm=True,
    num_experts=64,
    block_spec=block_spec,
    settings=Settings,
    hf=OlmoeHF("olmoe", "OlmoeForCausalLM", qk_norm=True, names=QWEN_MOE_NAMES,
               experts_key="num_experts", ffn_key="intermediate_size"),
)
