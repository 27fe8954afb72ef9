"""Tiny random Hugging Face models of architectures that no family in models/families
claims: what the hf backend trains with transformers' own code (``--backend auto``)."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMON = dict(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, pad_token_id=None)
# each architecture's own settings, chosen to matter (multipliers, experts, no-RoPE layers)
ARCHITECTURES = {
    "phi3": dict(),
    "granite": dict(embedding_multiplier=2.0, attention_multiplier=0.2,
                    residual_multiplier=0.5, logits_scaling=2.0),
    "olmo2": dict(),
    # a mixture of experts with a shared expert (Qwen3-MoE and Mixtral are families now)
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1),
    "smollm3": dict(no_rope_layer_interval=2),
    "cohere": dict(logit_scale=0.5, tie_word_embeddings=True),
}


def make_tiny_model(directory: Path, sp_model: str, model_type: str) -> Path:
    """A random ``model_type`` model (seeded) with the SentencePiece tokenizer ``sp_model``
    (1500 pieces; the rows up to 1536 leave room for the chat tokens)."""
    import sentencepiece
    import torch
    import transformers

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    config = transformers.AutoConfig.for_model(
        model_type, **{**COMMON, "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
                       **ARCHITECTURES[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    shutil.copy(sp_model, directory / "tokenizer.model")
    return directory
