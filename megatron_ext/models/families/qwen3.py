"""Qwen3 (dense): the Llama layout with a per-head RMSNorm on queries and keys (before
RoPE), no biases, RMSNorm epsilon 1e-6, RoPE base 1e6, and an explicit head size
(``head_dim``, e.g. 128 with hidden size 1024 and 16 heads) that need not be
hidden/heads. Small models tie their output layer to the word embeddings.

Sliding-window fields are read as for Qwen2 (every layer or none).
"""

from __future__ import annotations

from megatron_ext.models.family import LLAMA_LAYOUT, Family, GGUFLayout
from megatron_ext.models.hf_llama import LlamaLikeHF


FAMILY = Family(
    name="qwen3",
    legacy_name="qwen3",  # Megatron-LLM has no Qwen: the legacy writer refuses it
    **LLAMA_LAYOUT,
    rope_theta=1e6,
    layernorm_epsilon=1e-6,
    qk_layernorm=True,
    hf=LlamaLikeHF("qwen3", "Qwen3ForCausalLM", windowed=True, qk_norm=True,
                   layer_window_fields=True),
    gguf=GGUFLayout("qwen3", "qwen3", "Qwen3ForCausalLM"),
)
