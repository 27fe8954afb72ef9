"""GPT: LayerNorm, GeLU MLP of 4h, learned absolute positions, biases, tied embeddings.

No Hugging Face adapter: none of the ``transformers`` GPT models (GPT-2, GPT-J,
GPT-NeoX) has exactly this layout, and a near miss would convert silently wrong.
"""

from __future__ import annotations

from megatron_ext.models.family import Family, four_times_ffn_hidden_size

FAMILY = Family(
    name="gpt",
    legacy_name="gpt",
    normalization="LayerNorm",
    swiglu=False,
    position_embedding="learned_absolute",
    add_bias_linear=True,
    tie_embeddings=True,
    default_ffn_hidden_size=four_times_ffn_hidden_size,
    rope_theta=10000.0,
    layernorm_epsilon=1e-5,
)
