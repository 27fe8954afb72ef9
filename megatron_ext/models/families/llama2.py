"""Llama 2: Llama 1's architecture with norm epsilon 1e-5 (and GQA in its 70B model).

The default ``--model_name``, and the family a Llama config falls to when
nothing more specific claims it.
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.models.families.llama import plain_llama
from megatron_ext.models.family import LLAMA_LAYOUT, Family
from megatron_ext.models.hf_llama import LlamaLikeHF, rms_norm_eps


def matches(config: Mapping[str, Any]) -> bool:
    return plain_llama(config) and rms_norm_eps(config) > 1e-6


FAMILY = Family(
    name="llama2",
    legacy_name="llama2",
    **LLAMA_LAYOUT,
    rope_theta=10000.0,
    layernorm_epsilon=1e-5,
    hf=LlamaLikeHF("llama", "LlamaForCausalLM", matches),
)
