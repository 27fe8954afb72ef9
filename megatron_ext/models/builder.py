"""Build a megatron-core ``GPTModel`` for a family, a shape and a parallel layout.

Why here: the trainer and the converters must build byte-identical models
from the same arguments; this is the one place that maps our typed config to
megatron-core's ``TransformerConfig`` and layer spec.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ext.models.config import ModelArgs, MoEArgs, PrecisionArgs
from megatron_ext.models.families import get_family
from megatron_ext.parallel import ParallelArgs


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Gemma's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


def transformer_config(model: ModelArgs, parallel: ParallelArgs, precision: PrecisionArgs,
                       variable_seq_lengths: bool = False, use_cpu_initialization: bool = True,
                       init_weights: bool = True, moe: Optional[MoEArgs] = None):
    """megatron-core ``TransformerConfig`` for our ``ModelArgs``/``ParallelArgs``/``PrecisionArgs``
    (and ``MoEArgs``, how a mixture of experts trains: :func:`moe_config`)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    family = get_family(model.model_name)
    model = model.resolved()
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    window = model.attention_window
    recompute = precision.recompute_granularity
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_attention_heads_kv,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        normalization=family.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=family.swiglu,
        activation_func=ACTIVATIONS[family.activation_name],
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=family.add_qkv_bias,
        qk_layernorm=family.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        window_size=(window - 1, 0) if window else None,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.bf16,
        fp16=precision.fp16,
        variable_seq_lengths=variable_seq_lengths,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=init_weights,  # False when a checkpoint overwrites them all
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        attention_backend=AttnBackend.local,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **moe_config(model, parallel, moe or MoEArgs()),
        **model.settings.transformer_config(model),  # the family's own settings
    )


def moe_config(model: ModelArgs, parallel: ParallelArgs, moe: MoEArgs) -> dict:
    """The mixture-of-experts part of the ``TransformerConfig`` (resolved ``model``): the
    experts, top-k and expert parallelism, megatron-core's local experts (one MLP each, no
    grouped GEMM), dropless unless a capacity factor is given.

    The families' routing choices (softmax before or after the top-k) come from their
    settings (``FamilySettings.transformer_config``), after these."""
    if not model.num_experts:
        # megatron-core refuses variable lengths with its default MoE dispatcher (none here)
        return dict(moe_token_dispatcher_type="alltoall")
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_grouped_gemm=False,
    )


def layer_spec(config, init_seed: int, use_flash_attn: bool = False, norm=None):
    """Block spec: megatron-core's local layer with :class:`PortableAttention` and
    :class:`PortableNorm` (sequence-parallel capable; ``norm`` instead where given, a
    family's own), seeded per layer.

    Attention runs on PyTorch SDPA (flash-attn on CUDA with ``use_flash_attn``
    when installed), honouring padding/packing masks even with a sliding window.

    Each layer reseeds the CPU generator from (``init_seed``, its *global*
    layer number) before creating its weights, so a layer gets the same
    initial weights whatever pipeline stage builds it: PP=2 starts from
    exactly the weights of PP=1 (megatron-core alone is only TP-invariant).
    """
    import dataclasses

    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        get_transformer_layer_offset,
    )

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number=1, hidden_dropout=None,
                     pg_collection=None, vp_stage=None):
            global_number = layer_number + get_transformer_layer_offset(config, vp_stage)
            torch.manual_seed(init_seed * 100_003 + global_number)
            super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection,
                             vp_stage)

    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    # imported on first build, like megatron-core above: importing the builder (checkpointing
    # does) must not cost megatron-core
    from megatron_ext.models.attention import portable_layer_spec
    from megatron_ext.models.norm import PortableNorm

    norm = norm or PortableNorm
    spec = portable_layer_spec(config.normalization, use_flash_attn=use_flash_attn)
    attention = spec.submodules.self_attention
    if config.qk_layernorm:  # per-head norms of queries and keys (Qwen3)
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, q_layernorm=norm, k_layernorm=norm))
    submodules = dataclasses.replace(spec.submodules, input_layernorm=norm,
                                     pre_mlp_layernorm=norm, self_attention=attention)
    dense = dataclasses.replace(spec, module=SeededTransformerLayer, submodules=submodules)
    specs = [dense] * get_num_layers_to_build(config)
    if config.num_moe_experts:  # a mixture of experts: megatron-core's MoE layer (models/moe.py)
        from megatron_ext.models.moe import moe_mlp_spec

        moe = dataclasses.replace(dense, submodules=dataclasses.replace(
            submodules, mlp=moe_mlp_spec()))
        pattern = config.moe_layer_freq  # a list: 1 for the MoE layers, 0 for dense ones
        offset = get_transformer_layer_offset(config)
        specs = [moe if not isinstance(pattern, list) or pattern[offset + index] else dense
                 for index in range(len(specs))]
    # the block spec also names the final norm (megatron-core's default refuses sequence
    # parallelism without Transformer Engine)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)


def inverse_frequencies(base: float, dim: int, linear_factor: float | None = None
                        ) -> torch.Tensor:
    """RoPE inverse frequencies (megatron-core's and transformers' formula), divided by
    ``linear_factor`` for linear RoPE scaling as transformers divides them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return inv_freq / linear_factor if linear_factor else inv_freq


def layer_rotary(rotary_pos_emb, windowed: bool):
    """A layer's RoPE angles from what the model hands every layer: with two RoPE bases
    (:class:`PositionedGPTModel` stacks ``[global, local]`` on dim 2) the window layers'
    local angles or the others' global ones; otherwise the angles as given."""
    if isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.shape[2] == 2:
        return rotary_pos_emb[:, :, 1:2] if windowed else rotary_pos_emb[:, :, 0:1]
    return rotary_pos_emb


def rope_for_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor,
                       interleaved: bool = False) -> torch.Tensor:
    """RoPE angles ``[s, b, 1, dim]`` for explicit ``position_ids`` ``[b, s]``.

    The same numbers as megatron-core's ``RotaryEmbedding.get_emb`` (``[s, 1, 1,
    dim]``, positions ``0..s-1``) but per row, so samples packed into one row
    each start at position 0.
    """
    freqs = position_ids.t().to(inv_freq.dtype)[..., None] * inv_freq  # [s, b, dim/2]
    if interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class PositionedGPTModel(GPTModel):
        """``GPTModel`` whose RoPE follows ``position_ids``.

        megatron-core 0.16 derives rotary positions from the sequence length
        alone. Attention scores under RoPE depend only on the distance between
        positions, so a packed sample at offset 300 computes the same function,
        but with angles of larger positions that round differently in fp32/bf16;
        following ``position_ids`` gives a packed sample exactly the numbers it
        gets alone in a row (and is what learned absolute positions need anyway).
        Under context parallelism ``position_ids`` are the global positions of this
        rank's share of the row, so RoPE always follows them there.

        :func:`build_gpt_model` sets ``rope_inv_freqs`` where megatron-core's RoPE does
        not fit (linear scaling, or a second base for the window layers): RoPE is then
        computed here always, stacked ``[global, local]`` on dim 2 for
        :func:`layer_rotary`.
        """

        rope_inv_freqs: tuple = ()

        def _preprocess(self, input_ids, position_ids, decoder_input=None,
                        inference_context=None, packed_seq_params=None, padding_mask=None):
            out = super()._preprocess(input_ids, position_ids, decoder_input, inference_context,
                                      packed_seq_params, padding_mask)
            if self.rope_inv_freqs and out[1] is not None:
                return (out[0], self._own_rope(position_ids, inference_context, out[1]),
                        *out[2:])
            if (self.position_embedding_type != "rope" or position_ids is None
                    or inference_context is not None or packed_seq_params is not None
                    or out[1] is None):
                return out
            length = position_ids.shape[-1]
            plain = torch.arange(length, device=position_ids.device)
            if (self.config.context_parallel_size == 1
                    and torch.equal(position_ids, plain.expand_as(position_ids))):
                return out  # one sample per row: megatron-core's own angles
            rope = self.rotary_pos_emb
            inv_freq = rope.inv_freq.to(position_ids.device)
            emb = rope_for_positions(inv_freq, position_ids, rope.rotary_interleaved)
            return (out[0], emb.to(out[1].dtype), *out[2:])

        def _own_rope(self, position_ids, inference_context, upstream):
            """Angles from ``rope_inv_freqs`` for ``position_ids`` (positions ``0..L-1``,
            L = megatron-core's own length, for a KV cache or without ``position_ids``)."""
            if inference_context is not None or position_ids is None:
                position_ids = torch.arange(upstream.shape[0], device=upstream.device)[None]
            parts = [rope_for_positions(inv_freq.to(position_ids.device), position_ids,
                                        self.rotary_pos_emb.rotary_interleaved)
                     for inv_freq in self.rope_inv_freqs]
            return torch.cat(parts, dim=2).to(upstream.dtype)

    return PositionedGPTModel


def _scaled_output(scale: float, module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the embeddings times ``scale`` cast to their dtype (Gemma multiplies its
    word embeddings by sqrt(hidden) so, in their dtype, before the first layer)."""
    return output * torch.tensor(scale, dtype=torch.float32).to(output.dtype).to(output.device)


def build_gpt_model(model: ModelArgs, config, padded_vocab: int, pre_process: bool,
                    post_process: bool, init_seed: int = 1234, use_flash_attn: bool = False):
    """A ``GPTModel`` (this pipeline stage's layers) for ``ModelArgs`` ``model``.

    The block spec is the family's own when its file names one (called with the resolved
    ``model`` too: a family's layers may depend on its settings, e.g. Falcon's norms), else
    :func:`layer_spec`.
    Tied embeddings (``model.tie_embeddings``) are megatron-core's own: with PP > 1 the
    last stage holds a copy of the word embeddings as its output layer, made equal to the
    first stage's at build time and kept equal by ``finalize_model_grads`` summing their
    gradients over the embedding group.
    """
    family = get_family(model.model_name)
    model = model.resolved()
    if family.block_spec is not None:
        block = family.block_spec(config, init_seed, use_flash_attn, model=model)
    else:
        block = layer_spec(config, init_seed, use_flash_attn)
    torch.manual_seed(init_seed)  # embeddings: drawn first, on the first stage only
    built = _gpt_model_class()(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=family.position_embedding,
        rotary_base=int(model.rope_theta),
        rope_scaling=model.rope_scaling_type == "llama3",
        rope_scaling_factor=float(model.rope_scaling_factor or 8.0),
    )
    built.model_args = model  # what it was built from (checkpoint loads compare it)
    if family.scale_embeddings and pre_process:
        built.embedding.register_forward_hook(functools.partial(
            _scaled_output, model.hidden_size ** 0.5))
    linear = model.rope_scaling_factor if model.rope_scaling_type == "linear" else None
    local_theta = model.settings.window_rope_theta(model)
    if family.position_embedding == "rope" and (linear or local_theta):
        dim = model.kv_channels
        built.rope_inv_freqs = (inverse_frequencies(model.rope_theta, dim, linear),)
        if local_theta:  # the window layers' own base (Gemma 3), unscaled
            built.rope_inv_freqs += (inverse_frequencies(local_theta, dim),)
    return built
