"""Qwen3-MoE: the Qwen3 layout (per-head RMSNorm of queries and keys, epsilon 1e-6, RoPE
base 1e6, explicit head size, no biases) whose MLPs are mixtures of experts (Qwen3-30B-A3B:
128 experts, 8 per token, each 768 wide).

Routing: softmax over all the router's logits, the top-k experts, and with
``norm_topk_prob`` (every released model) their weights renormalised to sum to 1 -- then
megatron-core's default router computes the same (top-k of the logits, softmax over the
chosen); without it, the top-k of the softmax as they are (megatron-core's
``moe_router_pre_softmax``). Hugging Face names each expert's tensors on disk
(``mlp.experts.E.gate_proj/up_proj/down_proj``; ``models/hf_moe.py``).

Layers with a dense MLP (``decoder_sparse_step`` > 1, ``mlp_only_layers``; no released
model has them) are refused on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from megatron_ext.models.family import (
    LLAMA_LAYOUT,
    Family,
    FamilySettings,
    GGUFLayout,
    UnsupportedModelError,
    setting,
)
from megatron_ext.models.hf_moe import QWEN_MOE_NAMES, MoELlamaLikeHF

if TYPE_CHECKING:
    from megatron_ext.models.config import ModelArgs


@dataclass(frozen=True)
class Settings(FamilySettings):
    """How a Qwen3-MoE model weighs its chosen experts."""

    norm_topk_prob: bool = setting(
        True, "renormalise the top-k experts' routing weights to sum to 1 (Hugging Face "
              "norm_topk_prob); --no_norm_topk_prob: the softmax's weights as they are",
        off=True, example=False, negations=("--no_norm_topk_prob",))

    def transformer_config(self, model: "ModelArgs") -> dict:
        return {"moe_router_pre_softmax": not self.norm_topk_prob}

    def legacy_problems(self, model: "ModelArgs") -> list[str]:
        return []  # the legacy writer refuses the family whatever its settings


@dataclass(frozen=True)
class Qwen3MoeHF(MoELlamaLikeHF):
    """The Qwen3-MoE layout: Qwen3's attention, its experts' fields and routing flag."""

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        sparse_step = int(config.get("decoder_sparse_step") or 1)
        dense = list(config.get("mlp_only_layers") or [])
        if sparse_step != 1 or dense:
            raise UnsupportedModelError(
                f"{source}: layers with a dense MLP (decoder_sparse_step {sparse_step}, "
                f"mlp_only_layers {dense}) are not built; every layer must be a mixture of "
                "experts")
        return {**super().model_args(config, model_name, source),
                "norm_topk_prob": bool(config.get("norm_topk_prob", False))}

    def hf_config(self, args: "ModelArgs", *rest, **kwargs) -> dict:
        import dataclasses

        plain = dataclasses.replace(args, norm_topk_prob=None)  # a field of its own below
        config = super().hf_config(plain, *rest, **kwargs)
        config.update(norm_topk_prob=bool(args.norm_topk_prob), decoder_sparse_step=1,
                      mlp_only_layers=[])
        return config


def gguf_config(model) -> dict:
    """``config.json`` of a llama.cpp ``qwen3moe`` file (a ``GGUFModel``): the Llama-style
    reading with its experts (``expert_count``, ``expert_used_count``, the stacked
    ``ffn_*_exps`` widths)."""
    return {**model.llama_style_config(), "num_experts": int(model.arch_value("expert_count"))}


FAMILY = Family(
    name="qwen3_moe",
    legacy_name="qwen3_moe",  # Megatron-LLM has no mixture of experts: the legacy writer refuses it
    **LLAMA_LAYOUT,
    rope_theta=1e6,
    layernorm_epsilon=1e-6,
    qk_layernorm=True,
    num_experts=128,
    settings=Settings,
    hf=Qwen3MoeHF("qwen3_moe", "Qwen3MoeForCausalLM", windowed=True, qk_norm=True,
                  layer_window_fields=True, names=QWEN_MOE_NAMES, experts_key="num_experts",
                  ffn_key="moe_intermediate_size"),
    gguf=GGUFLayout("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM", config=gguf_config),
)
