"""The model's configuration: ``ModelArgs`` (architecture) and ``PrecisionArgs``.

Why here, on the models floor: the trainer, the converters, the checkpoint
readers and inference all build or describe a model from these; keeping them
below all of those lets each import them without reaching up into the
trainer. ``None`` in a ``ModelArgs`` field means "the family's default";
:meth:`ModelArgs.resolved` is the one place that fills those in. Importing
this module imports neither torch nor megatron-core.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from megatron_ext.cli import option
from megatron_ext.models.families import family_names, get_family


@dataclass(frozen=True)
class ModelArgs:
    """Architecture. ``None`` means: the family's default (see models/)."""

    model_name: str = option("llama2", "model family: sets norm, activation, RoPE base, biases",
                             choices=family_names())
    num_layers: int = option(2, "transformer layers")
    hidden_size: int = option(64, "width of the hidden states")
    num_attention_heads: int = option(4, "attention (query) heads")
    num_attention_heads_kv: Optional[int] = option(
        None, "key/value heads for grouped-query attention (default: all heads)")
    ffn_hidden_size: Optional[int] = option(None, "MLP width (default: the family's rule)")
    seq_length: int = option(2048, "longest sample in tokens")
    max_position_embeddings: Optional[int] = option(
        None, "positions the model is built for (default: --seq_length)")
    rope_theta: Optional[float] = option(None, "RoPE base (default: the family's)")
    rope_scaling_factor: Optional[float] = option(
        None, "Llama 3.1-style RoPE scaling with this factor (low/high frequency factors 1/4, "
              "original context 8192); default: none")
    layernorm_epsilon: Optional[float] = option(None, "epsilon of the normalisation layers "
                                                      "(default: the family's)")
    sliding_window_size: Optional[int] = option(
        None, "attention window (Mistral; default: the family's)")
    tie_embeddings: Optional[bool] = option(
        None, "share the input word embeddings with the output layer (Hugging Face "
              "tie_word_embeddings; default: the family's)",
        names=("--tie_embed_logits",), aliases=("--tie_word_embeddings",),
        negations=("--untie_embeddings_and_output_weights", "--untie_embed_logits"))
    kv_channels: Optional[int] = option(
        None, "attention head size (Hugging Face head_dim; default: hidden size / heads)",
        aliases=("--head_dim",))
    init_method_std: float = option(0.02, "standard deviation of the random initialisation")
    make_vocab_size_divisible_by: int = option(
        128, "pad the vocabulary to a multiple of this times --tensor_model_parallel_size")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  base: Optional["ModelArgs"] = None) -> "ModelArgs":
        """``values`` (a run config's ``model`` section, say) over ``base`` (else the
        defaults); keys that are not fields are ignored, so configs written by
        another version still load."""
        known = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(base or cls(),
                                   **{k: v for k, v in values.items() if k in known})

    def resolved(self) -> "ModelArgs":
        """Every architectural ``None`` replaced by what it means for this family.

        Why: a checkpoint or a converted config must record the architecture
        itself, not "the default of the version that wrote it". The window
        stays ``None`` for a family without one and becomes ``0`` ("none") when
        switched off for a family that has one.
        """
        family = get_family(self.model_name)
        window = self.sliding_window_size
        if window is None:
            window = family.sliding_window
        return dataclasses.replace(
            self,
            num_attention_heads_kv=self.num_attention_heads_kv or self.num_attention_heads,
            ffn_hidden_size=(self.ffn_hidden_size
                             or family.default_ffn_hidden_size(self.hidden_size)),
            max_position_embeddings=self.max_position_embeddings or self.seq_length,
            rope_theta=self.rope_theta or family.rope_theta,
            layernorm_epsilon=self.layernorm_epsilon or family.layernorm_epsilon,
            sliding_window_size=window or (0 if family.sliding_window else None),
            tie_embeddings=(family.tie_embeddings if self.tie_embeddings is None
                            else bool(self.tie_embeddings)),
            kv_channels=self.kv_channels or self.hidden_size // self.num_attention_heads,
        )

    @property
    def attention_window(self) -> Optional[int]:
        """Attention window in tokens: the flag, else the family's; None = no window."""
        return self.resolved().sliding_window_size or None


@dataclass(frozen=True)
class PrecisionArgs:
    bf16: bool = option(False, "bfloat16 mixed precision (CUDA only)")
    fp16: bool = option(False, "float16 mixed precision with loss scaling (CUDA only)")
    use_flash_attn: bool = option(False, "flash-attn kernels on CUDA when installed, "
                                         "else PyTorch SDPA")
    recompute_granularity: Optional[str] = option(
        None, "recompute activations in the backward pass to save memory: selective "
              "(attention only) or full (whole layers)", choices=("selective", "full"))

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up so every TP rank holds an equal, GPU-friendly slice."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
