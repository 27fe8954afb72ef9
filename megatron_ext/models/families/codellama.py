"""CodeLlama: Llama 2's architecture with RoPE base 1e6 (for its long contexts)."""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.models.family import LLAMA_LAYOUT, Family
from megatron_ext.models.hf_llama import LlamaLikeHF, rope_settings

ROPE_THETA = 1e6


def matches(config: Mapping[str, Any]) -> bool:
    """A Llama config with CodeLlama's RoPE base."""
    theta, _ = rope_settings(config)
    return abs(theta - ROPE_THETA) < 1.0


FAMILY = Family(
    name="codellama",
    legacy_name="codellama",
    **LLAMA_LAYOUT,
    rope_theta=ROPE_THETA,
    layernorm_epsilon=1e-5,
    hf=LlamaLikeHF("llama", "LlamaForCausalLM", matches),
)
