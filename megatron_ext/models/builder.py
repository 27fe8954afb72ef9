"""Build a megatron-core ``GPTModel`` for a family, a shape and a parallel layout.

Why here: the trainer and the converters must build byte-identical models
from the same arguments; this is the one place that maps our typed config to
megatron-core's ``TransformerConfig`` and layer spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.models.families import get_family, sliding_window


def transformer_config(model, parallel, precision, variable_seq_lengths: bool = False,
                       use_cpu_initialization: bool = True):
    """megatron-core ``TransformerConfig`` for our ``ModelArgs``/``ParallelArgs``/``PrecisionArgs``."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    family = get_family(model.model_name)
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    window = sliding_window(model)
    recompute = precision.recompute_granularity
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_attention_heads_kv or model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size or family.default_ffn_hidden_size(model.hidden_size),
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization=family.normalization,
        layernorm_epsilon=model.layernorm_epsilon or family.layernorm_epsilon,
        gated_linear_unit=family.swiglu,
        activation_func=F.silu if family.swiglu else F.gelu,
        add_bias_linear=family.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        window_size=(window - 1, 0) if window else None,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.bf16,
        fp16=precision.fp16,
        variable_seq_lengths=variable_seq_lengths,
        # megatron-core refuses variable lengths with its default MoE dispatcher (no MoE here)
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
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
    )


def layer_spec(config, init_seed: int, use_flash_attn: bool = False):
    """megatron-core's local layer spec with :class:`PortableAttention`, seeded per layer.

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

    from megatron_ext.models.attention import portable_layer_spec

    spec = portable_layer_spec(config.normalization, use_flash_attn=use_flash_attn)
    return dataclasses.replace(spec, module=SeededTransformerLayer)


def build_gpt_model(model, config, padded_vocab: int, pre_process: bool, post_process: bool,
                    init_seed: int = 1234, use_flash_attn: bool = False):
    """A ``GPTModel`` (this pipeline stage's layers) for ``ModelArgs`` ``model``."""
    from megatron.core.models.gpt import GPTModel

    family = get_family(model.model_name)
    torch.manual_seed(init_seed)  # embeddings: drawn first, on the first stage only
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, init_seed, use_flash_attn),
        vocab_size=padded_vocab,
        max_sequence_length=model.max_position_embeddings or model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=family.tie_embeddings,
        position_embedding_type=family.position_embedding,
        rotary_base=int(model.rope_theta or family.rope_theta),
    )
