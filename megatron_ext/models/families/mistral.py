"""Mistral: the Llama architecture with a 4096-token sliding attention window by default.

Its Hugging Face configs are told apart by ``model_type`` and carry the
window (``sliding_window``; ``null`` or ``use_sliding_window: false`` for none).
"""

from __future__ import annotations

from megatron_ext.models.family import LLAMA_LAYOUT, Family
from megatron_ext.models.hf_llama import LlamaLikeHF


FAMILY = Family(
    name="mistral",
    legacy_name="mistral",
    **LLAMA_LAYOUT,
    rope_theta=10000.0,
    layernorm_epsilon=1e-5,
    sliding_window=4096,
    hf=LlamaLikeHF("mistral", "MistralForCausalLM", windowed=True),
)
