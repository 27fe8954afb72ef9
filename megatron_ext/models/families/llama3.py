"""Llama 3 / 3.1: Llama 2's architecture with RoPE base 500000 (3.1 adds RoPE scaling,
``--rope_scaling_factor``).

Megatron-LLM has no ``llama3``: its code for ``llama2`` builds the same
network, so legacy checkpoints name it ``llama2`` (and record ours beside it).
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.models.families import codellama
from megatron_ext.models.family import LLAMA_LAYOUT, Family
from megatron_ext.models.hf_llama import LlamaLikeHF, rope_settings

MIN_ROPE_THETA = 500000.0


def matches(config: Mapping[str, Any]) -> bool:
    """A Llama config with a large RoPE base that is not CodeLlama's."""
    theta, _ = rope_settings(config)
    return theta >= MIN_ROPE_THETA and not codellama.FAMILY.hf.matches(config)


FAMILY = Family(
    name="llama3",
    legacy_name="llama2",
    **LLAMA_LAYOUT,
    rope_theta=MIN_ROPE_THETA,
    layernorm_epsilon=1e-5,
    hf=LlamaLikeHF("llama", "LlamaForCausalLM", matches),
)
