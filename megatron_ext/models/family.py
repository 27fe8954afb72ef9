"""What a model family file declares: the :class:`Family` record and the
:class:`HFAdapter` interface of its Hugging Face converter.

Why a record: a family is a handful of architectural choices (norm,
activation, positions, biases, tied embeddings, RoPE base, norm epsilon,
sliding window, FFN size rule) plus how it is exchanged with other code bases
(Hugging Face, Megatron-LLM). Each family writes them once, in its own file
under ``models/families/``; everything that builds, converts or names a model
reads them from there. This module imports neither torch nor megatron-core,
so flag parsing and validation can list the families cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

from megatron_ext.cli import option
from megatron_ext.errors import ConfigError

if TYPE_CHECKING:  # type hints only: importing a family must not import torch
    import torch

    from megatron_ext.models.config import ModelArgs


class UnsupportedModelError(ConfigError):
    """A Hugging Face model this project cannot convert exactly."""


def llama_ffn_hidden_size(hidden_size: int) -> int:
    """Llama's rule: 2/3 of 4h, rounded up to a multiple of 256 (16 for tiny models)."""
    multiple = 256 if hidden_size >= 1024 else 16
    size = int(2 * 4 * hidden_size / 3)
    return multiple * ((size + multiple - 1) // multiple)


# What every Llama-layout family shares; its file adds RoPE base, epsilon, window, HF adapter.
# tie_embeddings is only the default: Llama 3.2 1B/3B and SmolLM2 tie theirs (per model).
LLAMA_LAYOUT: dict[str, Any] = dict(
    normalization="RMSNorm", swiglu=True, position_embedding="rope", add_bias_linear=False,
    tie_embeddings=False, default_ffn_hidden_size=llama_ffn_hidden_size)


def four_times_ffn_hidden_size(hidden_size: int) -> int:
    """GPT's rule: 4h."""
    return 4 * hidden_size


class HFAdapter(Protocol):
    """How a family is exchanged with ``transformers``: config and weights, both ways.

    Weight maps work on *unsharded* state dicts (TP=PP=1 megatron-core names),
    one group at a time (embeddings, then each layer), so a 70B model converts
    in about one layer of memory.

    An adapter whose tensor names depend on the model, not only on the family (Falcon's
    norms and biases), may also define ``for_config(config) -> adapter``: the importer
    then reads through the adapter it returns (``hf_config.hf_adapter``).
    """

    model_type: str  # config.json "model_type" this adapter reads and writes

    # megatron-core's linear layers (module path in a layer, e.g. "mlp.linear_fc1") -> the HF
    # modules they hold ("mlp.gate_proj", "mlp.up_proj"): adapter targets and their export
    linear_names: Mapping[str, tuple[str, ...]]

    def linear_rows_from_megatron(self, module: str, rows: "torch.Tensor", num_heads: int,
                                  num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        """Rows laid out like ``module``'s output (its weight, an adapter's B, DoRA's
        magnitude), split by the HF modules of :attr:`linear_names` (same order)."""

    def matches(self, config: Mapping[str, Any]) -> bool:
        """True when ``config`` is this family's (exactly one family may say so)."""

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        """``ModelArgs`` fields for ``config``; refuses what the family cannot build exactly."""

    def hf_config(self, args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
                  eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
                  max_position_embeddings: Optional[int]) -> dict:
        """``config.json`` for resolved ``args`` (see :meth:`ModelArgs.resolved`)."""

    def embedding_names(self, tied: bool = False) -> list[str]:
        """The HF tensors outside the decoder layers (what the first conversion step reads):
        the word embeddings first, then the final norm's weight (the importer records the
        model's stored dtype from it), then the rest; ``tied``: the model's output layer is
        its word embeddings (no ``lm_head``)."""

    def layer_names(self, layer: int) -> list[str]:
        """The HF tensors of decoder layer ``layer``."""

    def embeddings_to_megatron(self, hf: Mapping[str, "torch.Tensor"], tokenizer_vocab: int,
                               padded_vocab: int, tied: bool = False
                               ) -> dict[str, "torch.Tensor"]: ...

    def layer_to_megatron(self, hf: Mapping[str, "torch.Tensor"], layer: int, num_heads: int,
                          num_kv_heads: int) -> dict[str, "torch.Tensor"]: ...

    def embeddings_from_megatron(self, state: Mapping[str, "torch.Tensor"],
                                 vocab_size: int, tied: bool = False
                                 ) -> dict[str, "torch.Tensor"]: ...

    def layer_from_megatron(self, state: Mapping[str, "torch.Tensor"], layer: int,
                            num_heads: int, num_kv_heads: int) -> dict[str, "torch.Tensor"]: ...


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp stores a family's models: GGUF ``general.architecture``
    ``architecture``, read as Hugging Face ``model_type`` / ``hf_class``
    (``models/gguf_checkpoint.py`` reads any file through its family's layout).

    An architecture is not always one family (llama.cpp's ``llama`` holds Llama 1-3.2,
    CodeLlama and Mistral): the family that declares it is the one whose HF config the
    file becomes; the config then names the family, as for a ``config.json``.
    """

    architecture: str
    model_type: str
    hf_class: str
    permuted_qk: bool = False  # query/key rows in llama.cpp's interleaved-RoPE order
    norm_offset: float = 0.0  # norm weights stored plus this (Gemma's 1 + w): subtracted
    split_qkv: bool = False  # one attn_qkv as [all q; all k; all v] (Falcon): regrouped
    # (the GGUFModel) -> config.json; None: the Llama-style config the reader builds from
    # the common keys
    config: Optional[Callable[[Any], dict]] = None
    # the export's inverse of ``config``: (resolved ModelArgs, HF config.json dict) ->
    # {"<key without the architecture prefix>": value} written beside (and over) the
    # Llama-style keys; raises UnsupportedModelError for what llama.cpp cannot run
    metadata: Optional[Callable[[Any, dict], dict]] = None
    # HF model types besides ``model_type`` whose models are exported under this
    # architecture (llama.cpp stores Mistral as ``llama``)
    also_exports: tuple[str, ...] = ()


OFF = "family_setting_off"  # a setting field's metadata: the value of families without it
EXAMPLE = "family_setting_example"  # ... and a value worth training with in the tests


def setting(default: Any, help: str, off: Any = None, example: Any = None, **flag: Any) -> Any:
    """A field of a family's :class:`FamilySettings`: ``default`` is the family's value,
    ``off`` the value of a model whose family has no such setting (what "absent" means:
    0 parallel norms, no second RoPE base), ``example`` a value other than the default
    that the generic tests train every family with; ``flag`` as for
    :func:`megatron_ext.cli.option` (the flag is ``--<field name>`` on ``ModelArgs``)."""
    declared = option(default, help, **flag)
    return dataclasses.field(default=default,
                             metadata={**declared.metadata, OFF: off, EXAMPLE: example})


@dataclass(frozen=True)
class FamilySettings:
    """What a family lets a model choose that other families do not have (Falcon's norms per
    layer, Gemma 3's global-layer pattern): a frozen dataclass of :func:`setting` fields in
    the family's file, named by ``Family.settings``.

    Each field becomes a ``ModelArgs`` field and flag (``None``: the family's default), is
    stored in ``run_config.json``'s ``model`` beside the others, compared by the checkpoint
    shape check and refused by name for a family that does not declare it
    (``models/config.py``); a name may be declared by several families (same type and
    ``off``). A field named like a :class:`Family` attribute (``add_bias_linear``) is that
    attribute's value, fixed, in families that do not declare it.

    The methods are how the shared code asks the settings what they change; the defaults
    change nothing. ``model`` is the resolved ``ModelArgs``.
    """

    def problems(self, model: "ModelArgs") -> list[str]:
        """What is wrong with these values for ``model`` (flag validation, no torch)."""
        return []

    def transformer_config(self, model: "ModelArgs") -> dict:
        """megatron-core ``TransformerConfig`` arguments these settings set."""
        return {}

    def window_layers(self, model: "ModelArgs") -> Optional[list[bool]]:
        """Per layer, whether the sliding window applies; None: on every layer."""
        return None

    def window_rope_theta(self, model: "ModelArgs") -> Optional[float]:
        """The sliding-window layers' own RoPE base; None: they rotate as the others."""
        return None

    def legacy_args(self, model: "ModelArgs") -> dict:
        """Megatron-LLM ``args`` that state these settings (its names)."""
        return {}

    @classmethod
    def from_legacy_args(cls, args: Mapping[str, Any]) -> dict:
        """These settings from a Megatron-LLM ``args`` (the inverse of :meth:`legacy_args`)."""
        return {}

    def legacy_problems(self, model: "ModelArgs") -> list[str]:
        """What of these settings Megatron-LLM cannot build (refused by the legacy writer);
        by default every setting that is not ``off`` (Megatron-LLM knows none of them)."""
        return [f"the {f.name} setting ({getattr(self, f.name)})"
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.metadata.get(OFF)]


@dataclass(frozen=True)
class NoSettings(FamilySettings):
    """A family without settings of its own."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One family's defaults and adapters (``models/families/<name>.py`` defines ``FAMILY``)."""

    name: str  # --model_name; equal to the file's name
    legacy_name: str  # Megatron-LLM's --model_name for this architecture
    normalization: str  # RMSNorm | LayerNorm
    swiglu: bool  # gated SiLU MLP (else GeLU)
    position_embedding: str  # rope | learned_absolute
    add_bias_linear: bool
    tie_embeddings: bool  # the default; a model may choose otherwise (--tie_embed_logits)
    default_ffn_hidden_size: Callable[[int], int]  # hidden size -> FFN size
    rope_theta: float = 10000.0
    layernorm_epsilon: float = 1e-5
    sliding_window: Optional[int] = None
    add_qkv_bias: bool = False  # biases on the query/key/value projection only (Qwen2)
    qk_layernorm: bool = False  # per-head norm of queries and keys (Qwen3)
    # the MLP's activation: silu | gelu | gelu_tanh; None: silu when gated (swiglu), else gelu
    activation: Optional[str] = None
    scale_embeddings: bool = False  # word embeddings times sqrt(hidden size) (Gemma)
    # the kinds of RoPE scaling (--rope_scaling_type) its layers and HF layout have
    rope_scaling_types: tuple[str, ...] = ("llama3",)
    # attention and MLP read one input and their outputs add up (Falcon): Megatron-LLM's
    # parallel_attn
    parallel_layers: bool = False
    # the settings only this family's models choose (a FamilySettings dataclass, in its file)
    settings: type = NoSettings
    hf: Optional[HFAdapter] = None  # None: no Hugging Face equivalent
    gguf: Optional[GGUFLayout] = None  # the llama.cpp architecture this family imports as
    # a mixture of experts' default number of experts (--num_experts); None: dense MLPs
    num_experts: Optional[int] = None
    # (megatron-core TransformerConfig, init seed, use_flash_attn, model=resolved ModelArgs)
    # -> block spec; None: the shared seeded block of models/builder.py
    block_spec: Optional[Callable[..., Any]] = None

    @property
    def activation_name(self) -> str:
        return self.activation or ("silu" if self.swiglu else "gelu")
