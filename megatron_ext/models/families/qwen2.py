"""Qwen2 / Qwen2.5: the Llama layout with biases on the query/key/value projection only,
RMSNorm epsilon 1e-6 and RoPE base 1e6; the small models tie their output layer to the
word embeddings (``tie_word_embeddings``), the large ones do not.

Sliding-window fields (``use_sliding_window``, ``sliding_window``,
``max_window_layers``, ``layer_types``) are honoured when the window applies to
every layer or to none (the released models use none); a window on some layers
only is refused by name.
"""

from __future__ import annotations

from megatron_ext.models.family import LLAMA_LAYOUT, Family, GGUFLayout
from megatron_ext.models.hf_llama import LlamaLikeHF


FAMILY = Family(
    name="qwen2",
    legacy_name="qwen2",  # Megatron-LLM has no Qwen: the legacy writer refuses it
    **LLAMA_LAYOUT,
    rope_theta=1e6,
    layernorm_epsilon=1e-6,
    add_qkv_bias=True,
    hf=LlamaLikeHF("qwen2", "Qwen2ForCausalLM", windowed=True, qkv_bias=True,
                   layer_window_fields=True),
    gguf=GGUFLayout("qwen2", "qwen2", "Qwen2ForCausalLM"),
)
