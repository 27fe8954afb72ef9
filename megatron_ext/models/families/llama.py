"""Llama 1: RMSNorm (epsilon 1e-6), SwiGLU, RoPE base 10000, no biases, separate output layer."""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.models.families import codellama, llama3
from megatron_ext.models.family import LLAMA_LAYOUT, Family, GGUFLayout
from megatron_ext.models.hf_llama import LlamaLikeHF, rms_norm_eps


def plain_llama(config: Mapping[str, Any]) -> bool:
    """A Llama config whose RoPE base no later generation (Llama 3, CodeLlama) claims."""
    return not (llama3.FAMILY.hf.matches(config) or codellama.FAMILY.hf.matches(config))


def matches(config: Mapping[str, Any]) -> bool:
    """Llama 1 is told from Llama 2 by its norm epsilon alone."""
    return plain_llama(config) and rms_norm_eps(config) <= 1e-6


FAMILY = Family(
    name="llama",
    legacy_name="llama",
    **LLAMA_LAYOUT,
    rope_theta=10000.0,
    layernorm_epsilon=1e-6,
    hf=LlamaLikeHF("llama", "LlamaForCausalLM", matches),
    gguf=GGUFLayout("llama", "llama", "LlamaForCausalLM", permuted_qk=True,
                    also_exports=("mistral",)),
)
