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
from megatron_ext.parallel import ParallelArgs


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
    # mixture of experts (Megatron-LM's names): None experts is a dense model
    num_experts: Optional[int] = option(
        None, "experts of each mixture-of-experts MLP (megatron-core's MoE layer; default: "
              "a dense MLP)")
    moe_router_topk: int = option(2, "experts each token is routed to (with --num_experts)")
    moe_ffn_hidden_size: Optional[int] = option(
        None, "each expert's MLP width (default: --ffn_hidden_size)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  base: Optional["ModelArgs"] = None) -> "ModelArgs":
        """``values`` (a run config's ``model`` section, say) over ``base`` (else the
        defaults); keys that are not fields are ignored, so configs written by
        another version still load."""
        known = {f.name for f in dataclasses.fields(cls)}
        # JSON has no tuples: a tuple setting (Qwen3-MoE's mlp_only_layers) comes back a list
        return dataclasses.replace(base or cls(), **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in values.items() if k in known})

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
            num_experts=self.num_experts or family.num_experts,
            moe_ffn_hidden_size=(self.moe_ffn_hidden_size or self.ffn_hidden_size
                                 or family.default_ffn_hidden_size(self.hidden_size)
                                 if self.num_experts or family.num_experts else None),
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
    def experts(self) -> Optional[int]:
        """The experts of each MoE layer: --num_experts, else the family's; None: dense."""
        return self.num_experts or get_family(self.model_name).num_experts

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


MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


@dataclass(frozen=True)
class MoEArgs:
    """How a mixture-of-experts model trains (Megatron-LM's flags): not its architecture
    (``ModelArgs.num_experts``, ``moe_router_topk``), so a run may change them."""

    moe_token_dispatcher_type: str = option(
        "alltoall", "how tokens reach the experts of other expert-parallel ranks: alltoall "
                    "(each rank sends each token to its experts' ranks) or allgather (every "
                    "rank gathers every token)", choices=("alltoall", "allgather"))
    moe_aux_loss_coeff: float = option(
        0.0, "weight of the load-balancing loss, added to the masked loss (logged "
             "separately as load_balancing_loss)")
    moe_router_load_balancing_type: str = option(
        "aux_loss", "the load-balancing loss: aux_loss (Switch's, over each micro-batch), "
                    "seq_aux_loss (per sequence), global_aux_loss (over the global batch) "
                    "or none", choices=MOE_LOAD_BALANCING)
    moe_z_loss_coeff: Optional[float] = option(
        None, "weight of the router's z-loss (ST-MoE: keeps router logits small); default: "
              "none")
    moe_expert_capacity_factor: Optional[float] = option(
        None, "drop the tokens beyond this factor times an expert's even share; default: "
              "dropless (no token dropped: the results equal the serial run's)")


def moe_problems(model: ModelArgs, moe: Optional[MoEArgs] = None,
                 parallel: Optional[ParallelArgs] = None,
                 variable_seq_lengths: bool = False) -> list[str]:
    """What is wrong with ``model``'s experts (and ``moe``'s settings) for training (at
    ``parallel``'s layout when given; ``ParallelArgs.problems`` checks the split;
    ``variable_seq_lengths``: rows as wide as their longest sample)."""
    problems = []
    experts, topk = model.experts, model.moe_router_topk
    if experts is None:
        return problems
    if (moe is not None and moe.moe_token_dispatcher_type == "allgather"
            and variable_seq_lengths and parallel is not None
            and parallel.expert_model_parallel_size * parallel.tensor_model_parallel_size > 1):
        problems.append("--moe_token_dispatcher_type allgather gathers equal numbers of tokens "
                        "from every expert-parallel rank: drop --variable_seq_lengths, or use "
                        "the alltoall dispatcher")
    if parallel is not None and parallel.tensor_model_parallel_size > 1 \
            and not parallel.sequence_parallel:
        problems.append("training a mixture of experts with --tensor_model_parallel_size > 1 "
                        "needs --sequence_parallel (megatron-core's MoE layer splits the "
                        "tokens, not the hidden states, over the TP ranks)")
    if experts < 1:
        problems.append(f"--num_experts must be positive, got {experts}")
    elif not 1 <= topk <= experts:
        problems.append(f"--moe_router_topk {topk} must be between 1 and --num_experts "
                        f"{experts} (each token goes to that many different experts)")
    if moe is not None and moe.moe_expert_capacity_factor is not None \
            and moe.moe_expert_capacity_factor <= 0:
        problems.append("--moe_expert_capacity_factor must be positive (or left out: dropless)")
    return problems


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
