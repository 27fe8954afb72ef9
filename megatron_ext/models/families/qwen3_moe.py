"""Qwen3-MoE: the Qwen3 layout (per-head RMSNorm of queries and keys, epsilon 1e-6, RoPE
base 1e6, explicit head size, no biases) whose MLPs are mixtures of experts (Qwen3-30B-A3B:
128 experts, 8 per token, each 768 wide).

Routing: softmax over all the router's logits, the top-k experts, and with
``norm_topk_prob`` (every released model) their weights renormalised to sum to 1 -- then
megatron-core's default router computes the same (top-k of the logits, softmax over the
chosen); without it, the top-k of the softmax as they are (megatron-core's
``moe_router_pre_softmax``). Hugging Face names each expert's tensors on disk
(``mlp.experts.E.gate_proj/up_proj/down_proj``; ``models/hf_moe.py``).

Layers with a dense MLP of ``intermediate_size`` (``decoder_sparse_step`` > 1,
``mlp_only_layers``; no released model has them) are this family's settings of the same
names (megatron-core's ``moe_layer_freq`` pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from megatron_ext.models.family import (
    LLAMA_LAYOUT,
    Family,
    FamilySettings,
    GGUFLayout,
    setting,
)
from megatron_ext.models.hf_llama import hf_layer_names, layer_from_megatron, layer_to_megatron
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
    decoder_sparse_step: int = setting(
        1, "every N-th layer (1-based) is a mixture of experts, the others have a dense MLP "
           "of --ffn_hidden_size (Hugging Face decoder_sparse_step)", off=1)
    mlp_only_layers: tuple[int, ...] = setting(
        (), "layers (0-based) with a dense MLP of --ffn_hidden_size whatever "
            "--decoder_sparse_step says (Hugging Face mlp_only_layers)", off=())

    def problems(self, model: "ModelArgs") -> list[str]:
        problems = []
        if self.decoder_sparse_step < 1:
            problems.append(f"--decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        outside = [layer for layer in self.mlp_only_layers
                   if not 0 <= layer < model.num_layers]
        if outside:
            problems.append(f"--mlp_only_layers {outside}: not layers of this "
                            f"{model.num_layers}-layer model")
        return problems

    def moe_layers(self, model: "ModelArgs") -> list[bool]:
        """Per layer, whether it is a mixture of experts (transformers' rule)."""
        return [layer not in self.mlp_only_layers
                and (layer + 1) % max(1, self.decoder_sparse_step) == 0
                for layer in range(model.num_layers)]

    def transformer_config(self, model: "ModelArgs") -> dict:
        config = {"moe_router_pre_softmax": not self.norm_topk_prob}
        layers = self.moe_layers(model)
        if not all(layers):  # megatron-core's pattern: 1 a mixture of experts, 0 dense
            config["moe_layer_freq"] = [int(moe) for moe in layers]
        return config

    def legacy_problems(self, model: "ModelArgs") -> list[str]:
        return []  # the legacy writer refuses the family whatever its settings


@dataclass(frozen=True)
class Qwen3MoeHF(MoELlamaLikeHF):
    """The Qwen3-MoE layout: Qwen3's attention, its experts' fields and routing flag."""

    moe_layers: tuple[bool, ...] = ()  # bound by for_config: per layer, experts or dense

    def for_config(self, config: Mapping[str, Any]) -> "Qwen3MoeHF":
        import dataclasses

        bound = super().for_config(config)
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or ())
        layers = range(int(config["num_hidden_layers"]))
        return dataclasses.replace(bound, moe_layers=tuple(
            layer not in dense and (layer + 1) % step == 0 for layer in layers))

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        return {**super().model_args(config, model_name, source),
                "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
                "decoder_sparse_step": int(config.get("decoder_sparse_step") or 1),
                "mlp_only_layers": tuple(int(layer)
                                         for layer in config.get("mlp_only_layers") or ())}

    def hf_config(self, args: "ModelArgs", *rest, **kwargs) -> dict:
        import dataclasses

        plain = dataclasses.replace(args, norm_topk_prob=None, decoder_sparse_step=None,
                                    mlp_only_layers=None)  # fields of their own below
        config = super().hf_config(plain, *rest, **kwargs)
        config.update(norm_topk_prob=bool(args.norm_topk_prob),
                      decoder_sparse_step=int(args.decoder_sparse_step),
                      mlp_only_layers=list(args.mlp_only_layers))
        return config

    def _dense(self, layer: int) -> bool:
        return bool(self.moe_layers) and not self.moe_layers[layer]

    def layer_names(self, layer: int) -> list[str]:
        if self._dense(layer):
            return hf_layer_names(layer, self.qkv_bias, self.qk_norm)
        return super().layer_names(layer)

    def layer_to_megatron(self, hf, layer: int, num_heads: int, num_kv_heads: int) -> dict:
        if self._dense(layer):
            return layer_to_megatron(hf, layer, num_heads, num_kv_heads, self.qkv_bias,
                                     self.qk_norm)
        return super().layer_to_megatron(hf, layer, num_heads, num_kv_heads)

    def layer_from_megatron(self, state, layer: int, num_heads: int,
                            num_kv_heads: int) -> dict:
        if f"decoder.layers.{layer}.mlp.router.weight" not in state:  # a dense layer
            return layer_from_megatron(state, layer, num_heads, num_kv_heads, self.qkv_bias,
                                       self.qk_norm)
        return super().layer_from_megatron(state, layer, num_heads, num_kv_heads)


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
