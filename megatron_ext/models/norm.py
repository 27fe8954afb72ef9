"""``PortableNorm``: megatron-core's torch LayerNorm/RMSNorm that also runs sequence-parallel.

Why: megatron-core's ``WrappedTorchNorm`` (its norm without Transformer
Engine or apex) refuses ``sequence_parallel``, although nothing in a
per-token norm depends on how the sequence is split. What sequence
parallelism needs is that the norm weights, replicated over TP ranks but
each fed only its slice of the sequence, have their gradients summed over
the TP group; megatron-core's ``finalize_model_grads`` does that for every
parameter marked ``sequence_parallel``. This norm is the torch norm plus that
mark, so ``--sequence_parallel`` works on CPU and on GPUs without TE.
"""

from __future__ import annotations

import torch


class PortableNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (megatron-core's norm signature)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("PortableNorm supports neither zero-centered gamma nor "
                             "memory-efficient layer norm")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r}: use LayerNorm or RMSNorm")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps,
                                           dtype=config.params_dtype)
        for parameter in norm.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        return norm
