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

from megatron_ext.cli import FLAG, option
from megatron_ext.models.families import family_names, get_family, setting_fields
from megatron_ext.models.family import FamilySettings


def _with_family_settings(cls: type) -> type:
    """``cls`` plus one field per family setting (``models/families/*.py``' ``Settings``):
    ``None`` (the family's value), typed and with the flag the family file declares.

    Why fields of ``ModelArgs`` rather than a nested object: the flags, ``run_config.json``'s
    ``model`` section (checkpoints already written keep these keys at its top level), the
    Megatron-LLM reader and every ``ModelArgs`` consumer see them as they see the others,
    and a family that brings a new setting edits only its own file."""
    for name, declared in setting_fields().items():
        if name in cls.__annotations__:
            raise TypeError(f"family setting {name!r} ({', '.join(declared.families)}) is "
                            "already a ModelArgs field")
        cls.__annotations__[name] = Optional[declared.type]
        setattr(cls, name, dataclasses.field(
            default=None, metadata={FLAG: declared.field.metadata[FLAG]}))
    return cls


@dataclass(frozen=True)
@_with_family_settings
class ModelArgs:
    """Architecture. ``None`` means: the family's default (see models/). Besides the fields
    below, one per family setting (:func:`_with_family_settings`)."""

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
    rope_scaling_type: Optional[str] = option(
        None, "what --rope_scaling_factor does: llama3 (Llama 3.1's frequency-dependent "
              "scaling) or linear (positions divided by the factor; on Gemma 3's global "
              "layers only); default: llama3", choices=("llama3", "linear"))
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
            rope_scaling_type=(self.rope_scaling_type or "llama3"
                               if self.rope_scaling_factor else None),
            **self._resolved_settings(),
        )

    def _resolved_settings(self) -> dict[str, Any]:
        """Each family setting: as given, else the family's (its ``Settings``' default, for
        a family without it the ``Family`` attribute of that name or the setting's
        ``off``). A value given to a family without the setting stays, for
        :func:`family_setting_problems` to refuse."""
        family = get_family(self.model_name)
        defaults = family.settings()
        values = {}
        for name, declared in setting_fields().items():
            value = getattr(self, name)
            if value is None:
                value = (getattr(defaults, name) if family.name in declared.families
                         else getattr(family, name, declared.off))
            values[name] = value
        return values

    def special_settings(self) -> dict[str, Any]:
        """The family settings whose (resolved) values a family without them could not have
        (not ``off``, nor the ``Family`` attribute of that name): what a layout that knows
        none of them has no place for."""
        family = get_family(self.model_name)
        resolved = self.resolved()
        return {name: getattr(resolved, name) for name, declared in setting_fields().items()
                if getattr(resolved, name) != getattr(family, name, declared.off)}

    @property
    def settings(self) -> FamilySettings:
        """The family's settings of this model (resolved), as its ``Settings`` object."""
        resolved = self.resolved()
        cls = get_family(self.model_name).settings
        return cls(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(cls)})

    @property
    def attention_window(self) -> Optional[int]:
        """Attention window in tokens: the flag, else the family's; None = no window."""
        return self.resolved().sliding_window_size or None

    @property
    def mask_window(self) -> Optional[int]:
        """The window every layer applies, which the shared attention mask may carry; None
        when there is none or it spares some layers (a family's ``window_layers``, Gemma 3's
        pattern): those attend globally, and the windowed layers apply the window
        themselves."""
        resolved = self.resolved()
        if resolved.settings.window_layers(resolved) is not None:
            return None
        return resolved.sliding_window_size or None

    def window_layers(self) -> list[bool]:
        """Per layer, whether the sliding window applies."""
        resolved = self.resolved()
        window = bool(resolved.sliding_window_size)
        layers = resolved.settings.window_layers(resolved)
        return [window and (layers is None or layers[i]) for i in range(resolved.num_layers)]


def _settings_as(cls: type, resolved: ModelArgs) -> FamilySettings:
    """``resolved``'s values of the settings of ``cls`` (another family's ``Settings``)."""
    return cls(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(cls)})


def family_setting_problems(model: ModelArgs) -> list[str]:
    """Settings ``model`` gives that its family's layers (or Hugging Face layout) have no
    place for, refused by name rather than silently built as something else; then what its
    family's settings say of their values (and, for a setting given to a family without
    it, what the families that have it say)."""
    family = get_family(model.model_name)
    resolved = model.resolved()
    problems = []
    scaling = resolved.rope_scaling_type
    if scaling is not None and scaling not in family.rope_scaling_types:
        problems.append(f"--rope_scaling_type={scaling}: the {family.name} family has no such "
                        "setting")
    checks = [family.settings]
    for name, declared in setting_fields().items():
        value = getattr(model, name)
        if value is None or family.name in declared.families:
            continue
        if value != getattr(family, name, declared.off):
            problems.append(f"--{name}={value}: the {family.name} family has no such setting")
            checks += [get_family(owner).settings for owner in declared.families]
    for cls in dict.fromkeys(checks):
        problems += _settings_as(cls, resolved).problems(resolved)
    return problems


# what the checkpoint shape check compares beyond megatron-core's TransformerConfig
def setting_differences(saved: ModelArgs, built: ModelArgs) -> list[str]:
    """The RoPE scaling and family settings that differ between two resolved ``ModelArgs``
    (a checkpoint's and this run's), as ``--flag: checkpoint X, this run Y``."""
    names = ("rope_scaling_factor", "rope_scaling_type", *setting_fields())
    return [f"--{name}: checkpoint {getattr(saved, name)}, this run {getattr(built, name)}"
            for name in names if getattr(saved, name) != getattr(built, name)]


@dataclass(frozen=True)
class PrecisionArgs:
    bf16: bool = option(False, "bfloat16 mixed precision: the model in bf16, fp32 main weights "
                               "and gradients in the optimizer, the loss in fp32")
    fp16: bool = option(False, "float16 mixed precision (as --bf16) with loss scaling "
                               "(--loss_scale, --initial_loss_scale, ...)")
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
