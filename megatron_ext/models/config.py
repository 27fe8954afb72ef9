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
    add_bias_linear: Optional[bool] = option(
        None, "biases on every linear layer (Falcon's bias; default: the family's)",
        negations=("--disable_bias_linear",))
    parallel_attn_norms: Optional[int] = option(
        None, "Falcon's parallel layers (attention and MLP read one input): 1 = one norm "
              "feeds both (Falcon-7B, Falcon2-11B), 2 = a norm each (Falcon-40B/180B); "
              "default: the family's")
    sliding_window_pattern: Optional[int] = option(
        None, "every N-th layer attends to the whole context, the others through "
              "--sliding_window_size (Gemma 3: 6); 0 = the window on every layer; default: "
              "the family's")
    rope_local_theta: Optional[float] = option(
        None, "RoPE base of the sliding-window layers (Gemma 3's rope_local_base_freq); "
              "default: the family's (Gemma 3: 10000), else --rope_theta")
    rope_scaling_type: Optional[str] = option(
        None, "what --rope_scaling_factor does: llama3 (Llama 3.1's frequency-dependent "
              "scaling) or linear (positions divided by the factor; on Gemma 3's global "
              "layers only); default: llama3", choices=("llama3", "linear"))
    query_pre_attn_scalar: Optional[float] = option(
        None, "attention scores are scaled by 1/sqrt(this) (Gemma's query_pre_attn_scalar); "
              "default: the head size")
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
            add_bias_linear=(family.add_bias_linear if self.add_bias_linear is None
                             else bool(self.add_bias_linear)),
            parallel_attn_norms=(family.parallel_attn_norms if self.parallel_attn_norms is None
                                 else self.parallel_attn_norms),
            sliding_window_pattern=(family.sliding_window_pattern
                                    if self.sliding_window_pattern is None
                                    else self.sliding_window_pattern),
            rope_scaling_type=(self.rope_scaling_type or "llama3"
                               if self.rope_scaling_factor else None),
            rope_local_theta=self.rope_local_theta or family.rope_local_theta,
            query_pre_attn_scalar=self.query_pre_attn_scalar or family.query_pre_attn_scalar,
        )

    @property
    def attention_window(self) -> Optional[int]:
        """Attention window in tokens: the flag, else the family's; None = no window."""
        return self.resolved().sliding_window_size or None

    @property
    def mask_window(self) -> Optional[int]:
        """The window every layer applies, which the shared attention mask may carry; None
        when there is none or it spares some layers (``sliding_window_pattern``): those
        attend globally, and the windowed layers apply the window themselves."""
        resolved = self.resolved()
        return None if resolved.sliding_window_pattern else resolved.sliding_window_size or None

    def window_layers(self) -> list[bool]:
        """Per layer, whether the sliding window applies."""
        resolved = self.resolved()
        pattern = resolved.sliding_window_pattern
        return [bool(resolved.sliding_window_size) and not (pattern and (i + 1) % pattern == 0)
                for i in range(resolved.num_layers)]


# the ModelArgs fields a family must list in Family.configurable before a run may set them
FAMILY_SETTINGS = {"add_bias_linear": "--add_bias_linear", "parallel_attn_norms":
                   "--parallel_attn_norms", "sliding_window_pattern": "--sliding_window_pattern",
                   "rope_local_theta": "--rope_local_theta",
                   "query_pre_attn_scalar": "--query_pre_attn_scalar",
                   "rope_scaling_type": "--rope_scaling_type"}


def family_setting_problems(model: ModelArgs) -> list[str]:
    """Settings ``model`` gives that its family's layers (or Hugging Face layout) have no
    place for: refused by name rather than silently built as something else."""
    family = get_family(model.model_name)
    resolved = model.resolved()
    problems = []
    for field, flag in FAMILY_SETTINGS.items():
        value = getattr(model, field)
        default = getattr(family, field, None)
        if field == "rope_scaling_type":
            value, default = resolved.rope_scaling_type, "llama3"
            if value is None:
                continue
        if value is not None and value != default and field not in family.configurable:
            problems.append(f"{flag}={value}: the {family.name} family has no such setting")
    if resolved.parallel_attn_norms not in (0, 1, 2):
        problems.append(f"--parallel_attn_norms {resolved.parallel_attn_norms}: use 1 or 2")
    if resolved.sliding_window_pattern and not resolved.sliding_window_size:
        problems.append(f"--sliding_window_pattern {resolved.sliding_window_pattern} needs "
                        "--sliding_window_size")
    return problems


def kv_head_problems(heads: int, kv: int, head_dim: int, tp: int) -> list[str]:
    """What keeps ``kv`` key/value heads (of ``heads`` query heads) from splitting over TP
    ``tp``. Fewer key/value heads than TP ranks is fine when TP is a multiple of them:
    megatron-core then gives each TP rank its group's one key/value head (the weights stay
    one copy, split like any other; the query/key/value projection's output is gathered
    over TP and each rank takes its group's heads, so the gradients of the shared heads
    sum over the ranks that use them)."""
    if kv and heads % kv:
        return [f"--num_attention_heads {heads} is not divisible by --num_attention_heads_kv "
                f"{kv}"]
    if kv % tp == 0:
        return []
    if tp % kv:
        return [f"--num_attention_heads_kv {kv} and --tensor_model_parallel_size {tp}: one "
                "must divide the other (TP ranks beyond the key/value heads share them)"]
    rows = (heads + 2 * kv) * head_dim
    if rows % tp:
        return [f"the query/key/value projection's {rows} rows ({heads} + 2 x {kv} heads of "
                f"{head_dim}) do not split over --tensor_model_parallel_size {tp}"]
    return []


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
