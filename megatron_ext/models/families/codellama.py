"""CodeLlama: Llama 2's architecture with RoPE base 1e6 (for its long contexts)."""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.models.family import Family, llama_ffn_hidden_size
from megatron_ext.models.hf_llama import LlamaLikeHF, rope_settings

ROPE_THETA = 1e6


def matches(config: Mapping[str, Any]) -> bool:
    """A Llama config with CodeLlama's RoPE base."""
    theta, _ = rope_settings(config)
    return abs(theta - ROPE_THETA) < 1.0


FAMILY = Family(
    name="codellama",
    legacy_name="codellama",
    normalization="RMSNorm",
    swiglu=True,
    position_embedding="rope",
    add_bias_linear=False,
    tie_embeddings=False,
    default_ffn_hidden_size=llama_ffn_hidden_size,
    rope_theta=ROPE_THETA,
    layernorm_epsilon=1e-5,
    hf=LlamaLikeHF("llama", "LlamaForCausalLM", matches),
)
