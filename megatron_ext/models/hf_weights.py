"""Hugging Face Llama/Mistral weights <-> megatron-core ``GPTModel`` (unsharded) weights.

Why here: a family's weight map must live beside its megatron-core config, so
the converters and the trainer agree on one layout. Both directions work on
*unsharded* state dicts (TP=PP=1 names and shapes); sharding to any TP/PP is
megatron-core ``dist_checkpointing``'s job.

Layout differences handled:

* q, k, v: HF keeps three matrices; megatron-core one ``linear_qkv`` whose
  rows are grouped per key/value head: for each group, its query heads, then
  its key head, then its value head.
* gate/up: HF ``gate_proj`` and ``up_proj``; megatron-core one ``linear_fc1``
  holding ``[gate; up]``.
* RoPE: both use the rotate-half convention (``rotary_interleaved=False``), so
  q/k rows need no permutation.
* vocabulary: megatron pads it for tensor parallelism. Rows for tokens the
  HF checkpoint lacks (``--vocab_extra_ids_list``) start as the mean of the
  existing embeddings (so new special tokens begin as an "average" token, not
  noise); padding rows beyond the tokenizer are zero.
"""

from __future__ import annotations

from typing import Mapping

import torch


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    num_kv_heads: int) -> torch.Tensor:
    head_dim = q.shape[0] // num_heads
    hidden = q.shape[1]
    per_group = num_heads // num_kv_heads
    q = q.view(num_kv_heads, per_group, head_dim, hidden)
    k = k.view(num_kv_heads, 1, head_dim, hidden)
    v = v.view(num_kv_heads, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_from_megatron(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    per_group = num_heads // num_kv_heads
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    grouped = qkv.view(num_kv_heads, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(-1, hidden)
    k = grouped[:, per_group].reshape(-1, hidden)
    v = grouped[:, per_group + 1].reshape(-1, hidden)
    return q, k, v


def pad_vocab_rows(weight: torch.Tensor, tokenizer_vocab: int, padded_vocab: int) -> torch.Tensor:
    """Rows for extra tokens = mean row; rows past the tokenizer = 0."""
    rows, width = weight.shape
    if padded_vocab < rows:
        raise ValueError(f"padded vocabulary {padded_vocab} is smaller than the checkpoint's {rows}")
    out = torch.zeros(padded_vocab, width, dtype=weight.dtype)
    out[:rows] = weight
    if tokenizer_vocab > rows:
        out[rows:tokenizer_vocab] = weight.float().mean(dim=0).to(weight.dtype)
    return out


HF_LAYER_SUFFIXES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)


def hf_layer_names(layer: int) -> list[str]:
    """The HF tensors of decoder layer ``layer`` (what one conversion step reads)."""
    return [f"model.layers.{layer}.{suffix}" for suffix in HF_LAYER_SUFFIXES]


def layer_to_megatron(hf: Mapping[str, torch.Tensor], layer: int, num_heads: int,
                      num_kv_heads: int) -> dict[str, torch.Tensor]:
    """One decoder layer, HF names -> megatron-core names (global layer number kept)."""
    src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    return {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
        dst + "self_attention.linear_qkv.weight": qkv_to_megatron(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], num_heads, num_kv_heads),
        dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
        dst + "mlp.linear_fc1.weight": torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0),
        dst + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
    }


def layer_from_megatron(state: Mapping[str, torch.Tensor], layer: int, num_heads: int,
                        num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_to_megatron`."""
    src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    q, k, v = qkv_from_megatron(state[src + "self_attention.linear_qkv.weight"], num_heads,
                                num_kv_heads)
    gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
    out = {
        dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
        dst + "self_attn.q_proj.weight": q,
        dst + "self_attn.k_proj.weight": k,
        dst + "self_attn.v_proj.weight": v,
        dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
        dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
        dst + "mlp.gate_proj.weight": gate,
        dst + "mlp.up_proj.weight": up,
        dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
    }
    return {key: value.contiguous() for key, value in out.items()}


def embeddings_to_megatron(hf: Mapping[str, torch.Tensor], tokenizer_vocab: int,
                           padded_vocab: int, tie_embeddings: bool = False
                           ) -> dict[str, torch.Tensor]:
    """Word embeddings, final norm and output layer (vocabulary padded, new rows = mean)."""
    out = {"embedding.word_embeddings.weight":
           pad_vocab_rows(hf["model.embed_tokens.weight"], tokenizer_vocab, padded_vocab),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not tie_embeddings:
        head = hf["lm_head.weight"] if "lm_head.weight" in hf else hf["model.embed_tokens.weight"]
        out["output_layer.weight"] = pad_vocab_rows(head, tokenizer_vocab, padded_vocab)
    return out


def embeddings_from_megatron(state: Mapping[str, torch.Tensor], vocab_size: int,
                             tie_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`embeddings_to_megatron`; drops the vocabulary padding."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    return {key: value.contiguous() for key, value in out.items()}


def llama_to_megatron(hf: Mapping[str, torch.Tensor], num_layers: int, num_heads: int,
                      num_kv_heads: int, tokenizer_vocab: int, padded_vocab: int,
                      tie_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM``/``MistralForCausalLM`` state dict to megatron-core names."""
    out = embeddings_to_megatron(hf, tokenizer_vocab, padded_vocab, tie_embeddings)
    for i in range(num_layers):
        out.update(layer_to_megatron(hf, i, num_heads, num_kv_heads))
    return out


def megatron_to_llama(state: Mapping[str, torch.Tensor], num_layers: int, num_heads: int,
                      num_kv_heads: int, vocab_size: int,
                      tie_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`llama_to_megatron`; drops the vocabulary padding."""
    out = embeddings_from_megatron(state, vocab_size, tie_embeddings)
    for i in range(num_layers):
        out.update(layer_from_megatron(state, i, num_heads, num_kv_heads))
    return out
