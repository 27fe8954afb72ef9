"""Mixtral: the Mistral layout (RMSNorm epsilon 1e-5, SwiGLU, RoPE base 1e6, no biases)
whose MLPs are mixtures of 8 experts, each token routed to the top 2.

Routing: softmax over the router's logits, the top-k experts, their weights renormalised to
sum to 1; megatron-core's default router (top-k of the logits, softmax over the chosen)
computes the same selection and weights. No shared expert; ``router_jitter_noise`` is
refused (not built). Hugging Face names each expert's tensors on disk
(``block_sparse_moe.experts.E.w1/w3/w2``; ``models/hf_moe.py``).
"""

from __future__ import annotations

from megatron_ext.models.family import LLAMA_LAYOUT, Family
from megatron_ext.models.hf_moe import MIXTRAL_NAMES, MoELlamaLikeHF

FAMILY = Family(
    name="mixtral",
    legacy_name="mixtral",  # Megatron-LLM has no mixture of experts: the legacy writer refuses it
    **LLAMA_LAYOUT,
    rope_theta=1e6,
    layernorm_epsilon=1e-5,
    num_experts=8,
    hf=MoELlamaLikeHF("mixtral", "MixtralForCausalLM", windowed=True, names=MIXTRAL_NAMES,
                      experts_key="num_local_experts", ffn_key="intermediate_size"),
)
