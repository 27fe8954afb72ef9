"""Gemma 3 (text only: ``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``).

What sets it apart from the Llama layout, and where each lives here:

* four RMSNorms per layer, each scaling by ``1 + weight`` (weights start at 0), computed
  in float32 as transformers does (``GemmaNorm``): the input norm, a norm of the
  attention's output before the residual add (``post_attention_layernorm``), the
  pre-feedforward norm (megatron-core's ``pre_mlp_layernorm``) and a norm of the MLP's
  output before its residual add (``post_mlp_layernorm``); per-head ``1 + weight`` norms
  of queries and keys; the final norm;
* word embeddings multiplied by sqrt(hidden) in their dtype and tied to the output layer
  (``Family.scale_embeddings``, applied by the builder's model);
* an explicit head size (256 at 270M, whatever hidden / heads is) and attention scores
  scaled by ``query_pre_attn_scalar ** -0.5``;
* sliding-window attention on all layers but every ``sliding_window_pattern``-th
  (``layer_types`` in the config), which attend globally; the window layers rotate with
  their own RoPE base (``rope_local_base_freq``, 10000), the global ones with
  ``rope_theta`` (1e6) and the config's linear RoPE scaling if any (4B and up): the
  model hands every layer both angle sets and ``GemmaSelfAttention`` takes its own;
* a GeGLU MLP (gated, tanh-approximated GELU).

Megatron-LLM has no Gemma: the legacy writer refuses it. Configs with logit soft-capping
(Gemma 2), bidirectional attention (EmbeddingGemma) or RoPE scaling other than linear are
refused by name.

torch and megatron-core are imported on first build (listing families stays cheap).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Optional

from dataclasses import dataclass

from megatron_ext.models.family import (
    Family,
    FamilySettings,
    GGUFLayout,
    UnsupportedModelError,
    four_times_ffn_hidden_size,
    setting,
)
from megatron_ext.models import hf_llama

if TYPE_CHECKING:
    import torch

    from megatron_ext.models.config import ModelArgs

MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"
ACTIVATION = "gelu_pytorch_tanh"
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings(FamilySettings):
    """What a Gemma 3 model chooses beyond the shared ``ModelArgs``: which layers attend
    globally, the window layers' RoPE base, the attention scale."""

    sliding_window_pattern: int = setting(
        6, "every N-th layer attends to the whole context, the others through "
           "--sliding_window_size (Gemma 3: 6); 0 = the window on every layer; default: "
           "the family's", off=0, example=2)
    rope_local_theta: Optional[float] = setting(
        LOCAL_THETA, "RoPE base of the sliding-window layers (Gemma 3's "
                     "rope_local_base_freq); default: the family's (Gemma 3: 10000), else "
                     "--rope_theta")
    query_pre_attn_scalar: Optional[float] = setting(
        None, "attention scores are scaled by 1/sqrt(this) (Gemma's "
              "query_pre_attn_scalar); default: the head size")

    def problems(self, model: "ModelArgs") -> list[str]:
        if self.sliding_window_pattern and not model.sliding_window_size:
            return [f"--sliding_window_pattern {self.sliding_window_pattern} needs "
                    "--sliding_window_size"]
        return []

    def transformer_config(self, model: "ModelArgs") -> dict:
        scalar = self.query_pre_attn_scalar
        # layers N, 2N, ... (1-based) attend globally; the window is on the others
        return {"window_attn_skip_freq": self.sliding_window_pattern or None,
                "softmax_scale": scalar ** -0.5 if scalar else None}

    def window_layers(self, model: "ModelArgs") -> Optional[list[bool]]:
        pattern = self.sliding_window_pattern
        if not pattern:
            return None
        return [bool((i + 1) % pattern) for i in range(model.num_layers)]

    def window_rope_theta(self, model: "ModelArgs") -> Optional[float]:
        return self.rope_local_theta


# ------------------------------------------------------------------ layers
@functools.cache
def _modules():
    """(GemmaNorm, GemmaSelfAttention, gemma_layer), defined on first use."""
    import torch
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.utils import is_layer_window_attention

    from megatron_ext.models.builder import layer_rotary

    class GemmaNorm(torch.nn.Module):
        """RMSNorm scaling by ``1 + weight`` in float32, cast back (transformers' order, so
        fp32 runs agree to rounding and bf16 runs round where transformers rounds).

        Why not the torch norm with ``1 + w`` stored: converting back would give
        ``(1 + w) - 1``, which is not ``w`` in floating point; the round trip to Hugging
        Face must be bit-exact. Marked ``sequence_parallel`` like
        :class:`~megatron_ext.models.norm.PortableNorm`, so that sequence-parallel
        gradients sum over TP."""

        def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_ignored):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            self.weight.sequence_parallel = config.sequence_parallel

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * (1.0 + self.weight.float())).type_as(x)

    class GemmaSelfAttention(SelfAttention):
        """megatron-core's attention rotating with its layer's RoPE angles (local on window
        layers, global on the others)."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.windowed = is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, self.layer_number)

        def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
            return super().forward(hidden_states, *args, **kwargs,
                                   rotary_pos_emb=layer_rotary(rotary_pos_emb, self.windowed))

    def gemma_layer(base):
        """``base`` (the seeded megatron-core layer) with Gemma's norms of the attention's
        and the MLP's outputs, applied before their residual adds by forward hooks, so
        megatron-core's layer forward (recompute, KV cache, sequence parallelism) stays
        its own and its MLP stays its own class."""

        class GemmaLayer(base):
            def __init__(self, config, *args, **kwargs):
                super().__init__(config, *args, **kwargs)
                eps = config.layernorm_epsilon
                self.post_attention_layernorm = GemmaNorm(config, config.hidden_size, eps)
                self.post_mlp_layernorm = GemmaNorm(config, config.hidden_size, eps)
                self.self_attention.register_forward_hook(self._norm_attention_output)
                self.mlp.register_forward_hook(self._norm_mlp_output)

            def _norm_attention_output(self, module, inputs, output):
                return self._normed(self.post_attention_layernorm, output)

            def _norm_mlp_output(self, module, inputs, output):
                return self._normed(self.post_mlp_layernorm, output)

            @staticmethod
            def _normed(norm, output):
                hidden, bias = output
                assert bias is None, "Gemma's linear layers have no biases"
                return norm(hidden), None

        return GemmaLayer

    return GemmaNorm, GemmaSelfAttention, gemma_layer


def block_spec(config, init_seed: int, use_flash_attn: bool = False,
               model: Optional["ModelArgs"] = None):
    """The shared seeded block (:func:`~megatron_ext.models.builder.layer_spec`) with Gemma's
    norms everywhere, its attention and its layer (``model``: unused, all is in
    ``config``)."""
    import dataclasses

    from megatron_ext.models.builder import layer_spec

    norm, attention, gemma_layer = _modules()
    block = layer_spec(config, init_seed, use_flash_attn, norm=norm)

    layer = gemma_layer(block.layer_specs[0].module)  # every layer spec is the same one

    def gemma(spec):
        sub = spec.submodules
        return dataclasses.replace(spec, module=layer,
                                   submodules=dataclasses.replace(sub, self_attention=(
                                       dataclasses.replace(sub.self_attention,
                                                           module=attention))))

    return dataclasses.replace(block, layer_specs=[gemma(s) for s in block.layer_specs])


# ------------------------------------------------------------------ Hugging Face
# Gemma's names for the norms megatron-core's layer does not have, or names otherwise
GEMMA_NORMS = (("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
               ("pre_feedforward_layernorm.weight", "pre_mlp_layernorm.weight"),
               ("post_feedforward_layernorm.weight", "post_mlp_layernorm.weight"))


def _rope(config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(global, local) RoPE parameters from either config layout: transformers 5's
    ``rope_parameters`` per layer type, or the older ``rope_theta`` /
    ``rope_local_base_freq`` / ``rope_scaling``."""
    parameters = config.get("rope_parameters") or {}
    if "full_attention" in parameters or "sliding_attention" in parameters:
        full = dict(parameters.get("full_attention") or {})
        local = dict(parameters.get("sliding_attention") or {})
    else:
        full = dict(config.get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", config.get("rope_theta") or GLOBAL_THETA)
    local.setdefault("rope_theta", config.get("rope_local_base_freq") or LOCAL_THETA)
    return full, local


def _kind(rope: Mapping[str, Any]) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def layer_kinds(config: Mapping[str, Any]) -> list[bool]:
    """Per layer, whether it is a sliding-window layer (``layer_types``, else the older
    ``sliding_window_pattern``, default 6)."""
    layers = int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if kinds:
        return [kind == "sliding_attention" for kind in kinds]
    pattern = int(config.get("sliding_window_pattern") or 6)
    return [bool((i + 1) % pattern) for i in range(layers)]


def window_pattern(windowed: list[bool]) -> Optional[int]:
    """The N for which exactly the layers N, 2N, ... (1-based) attend globally; 0 when
    every layer is windowed; None when no such N describes ``windowed``."""
    if all(windowed):
        return 0
    pattern = windowed.index(False) + 1
    expected = [bool((i + 1) % pattern) for i in range(len(windowed))]
    return pattern if expected == windowed else None


def model_args(config: Mapping[str, Any], model_name: str, source: str) -> dict:
    problems = []
    for flag in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(flag) is not None:
            problems.append(f"{flag}={config[flag]} (Gemma 2's soft-capping is not built)")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    activation = config.get("hidden_activation") or config.get("hidden_act") or ACTIVATION
    if activation != ACTIVATION:
        problems.append(f"hidden_activation {activation!r} (GeGLU uses {ACTIVATION})")
    full, local = _rope(config)
    factor = None
    if _kind(full) == "linear":
        factor = float(full["factor"])
    elif _kind(full) != "default":
        problems.append(f"RoPE scaling {full} on the global layers (only linear is built)")
    if _kind(local) != "default":
        problems.append(f"RoPE scaling {local} on the sliding-window layers")
    windowed = layer_kinds(config)
    window = config.get("sliding_window")
    pattern = window_pattern(windowed)
    if not any(windowed):
        window, pattern = None, 0
    elif not window:
        problems.append("sliding layers without a sliding_window")
    elif pattern is None:
        problems.append(f"layer_types {config.get('layer_types')}: only every N-th layer "
                        "attending globally is built")
    if problems:
        raise UnsupportedModelError(f"{source}: cannot convert exactly: " + "; ".join(problems))
    return {
        **hf_llama.shape_args(config, model_name, 32768),
        "rope_theta": float(full["rope_theta"]),
        "rope_local_theta": float(local["rope_theta"]),
        "rope_scaling_factor": factor,
        "rope_scaling_type": "linear" if factor else None,
        "layernorm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "sliding_window_size": int(window) if window else 0,
        "sliding_window_pattern": pattern,
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "kv_channels": int(config.get("head_dim") or 256),
        "query_pre_attn_scalar": float(config.get("query_pre_attn_scalar") or 256),
    }


def hf_config(args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
              eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
              max_position_embeddings: Optional[int] = None) -> dict:
    """``config.json`` transformers 5 reads, with the older fields (``rope_theta``,
    ``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``) beside it for
    readers that know only those."""
    if args.add_bias_linear:
        raise UnsupportedModelError("Gemma 3 has no linear biases (--add_bias_linear)")
    if args.rope_scaling_factor and args.rope_scaling_type != "linear":
        raise UnsupportedModelError(f"Gemma 3 scales RoPE linearly, not with "
                                    f"{args.rope_scaling_type}")
    scalar = float(args.query_pre_attn_scalar or args.kv_channels)
    if not scalar.is_integer():
        raise UnsupportedModelError(f"Gemma 3's query_pre_attn_scalar is an integer, not "
                                    f"{scalar}")
    windowed = args.window_layers()
    full = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    if args.rope_scaling_factor:
        full = {"rope_type": "linear", "factor": float(args.rope_scaling_factor),
                "rope_theta": float(args.rope_theta)}
    local_theta = float(args.rope_local_theta or args.rope_theta)
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **hf_llama.shape_config(args, vocab_size, max_position_embeddings),
        "hidden_activation": ACTIVATION,
        # an int in transformers' (strict) config class
        "query_pre_attn_scalar": int(scalar),
        "sliding_window": args.attention_window,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windowed],
        "sliding_window_pattern": args.sliding_window_pattern or args.num_layers + 1,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default",
                                                  "rope_theta": local_theta}},
        "rope_theta": float(args.rope_theta),
        "rope_local_base_freq": local_theta,
        **hf_llama.config_tail(bos_token_id, eos_token_id, pad_token_id, torch_dtype),
    }
    if args.rope_scaling_factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(args.rope_scaling_factor)}
    return config


class Gemma3HF:
    """:class:`~megatron_ext.models.family.HFAdapter` for Gemma 3: the Llama tensor layout
    (q/k/v grouped into ``linear_qkv``, gate/up into ``linear_fc1``, per-head q/k norms)
    plus Gemma's three other layer norms (:data:`GEMMA_NORMS`)."""

    model_type = MODEL_TYPE
    linear_names = hf_llama.LINEAR_NAMES

    def linear_rows_from_megatron(self, module: str, rows: "torch.Tensor", num_heads: int,
                                  num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        return hf_llama.linear_rows_from_megatron(module, rows, num_heads, num_kv_heads)

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == MODEL_TYPE

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        return model_args(config, model_name, source)

    def hf_config(self, args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
                  eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
                  max_position_embeddings: Optional[int] = None) -> dict:
        return hf_config(args, vocab_size, bos_token_id, eos_token_id, pad_token_id,
                         torch_dtype, max_position_embeddings)

    def embedding_names(self, tied: bool = False) -> list[str]:
        return [name for name in hf_llama.EMBEDDING_NAMES
                if not (tied and name == "lm_head.weight")]

    def layer_names(self, layer: int) -> list[str]:
        names = [name for name in hf_llama.hf_layer_names(layer, qk_norm=True)
                 if not name.endswith(".post_attention_layernorm.weight")]
        return names + [f"model.layers.{layer}.{theirs}" for theirs, _ in GEMMA_NORMS]

    def embeddings_to_megatron(self, hf: Mapping[str, "torch.Tensor"], tokenizer_vocab: int,
                               padded_vocab: int, tied: bool = False
                               ) -> dict[str, "torch.Tensor"]:
        return hf_llama.embeddings_to_megatron(hf, tokenizer_vocab, padded_vocab, tied)

    def embeddings_from_megatron(self, state: Mapping[str, "torch.Tensor"], vocab_size: int,
                                 tied: bool = False) -> dict[str, "torch.Tensor"]:
        return hf_llama.embeddings_from_megatron(state, vocab_size, tied)

    def layer_to_megatron(self, hf: Mapping[str, "torch.Tensor"], layer: int, num_heads: int,
                          num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        # the Llama mapping reads post_attention_layernorm as the pre-MLP norm: hand it
        # Gemma's pre-feedforward norm under that name, then map the other two
        llama_view = dict(hf)
        llama_view[src + "post_attention_layernorm.weight"] = hf[
            src + "pre_feedforward_layernorm.weight"]
        out = hf_llama.layer_to_megatron(llama_view, layer, num_heads, num_kv_heads,
                                         qk_norm=True)
        for theirs, ours in GEMMA_NORMS:
            out[dst + ours] = hf[src + theirs]
        return out

    def layer_from_megatron(self, state: Mapping[str, "torch.Tensor"], layer: int,
                            num_heads: int, num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out = hf_llama.layer_from_megatron(state, layer, num_heads, num_kv_heads, qk_norm=True)
        del out[dst + "post_attention_layernorm.weight"]  # the pre-MLP norm, renamed below
        for theirs, ours in GEMMA_NORMS:
            out[dst + theirs] = state[src + ours].contiguous()
        return out



# ---------------------------------------------------------------- GGUF (llama.cpp)
# what llama.cpp's Gemma 3 loader fixes instead of reading it from the file: every 6th
# layer global, the others' RoPE base, the attention scalar (hidden / heads for the 62
# layers of 27B, else the head size)
GGUF_PATTERN, GGUF_LOCAL_THETA, GGUF_27B_LAYERS = 6, LOCAL_THETA, 62


def gguf_config(model) -> dict:
    """Gemma 3's ``config.json`` from a GGUF file (``model``: the reader's ``GGUFModel``):
    the Llama-style fields, then what llama.cpp's loader fixes (see the constants). Its
    ``1 + w`` norm weights are stored as ``1 + w`` (the layout's ``norm_offset``)."""
    config = model.llama_style_config()
    del config["hidden_act"]
    window = model.arch_value("attention.sliding_window")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    config.update(
        hidden_activation=ACTIVATION,
        sliding_window=int(window) if window else None,
        layer_types=[("sliding_attention" if window and (i + 1) % GGUF_PATTERN
                      else "full_attention") for i in range(config["num_hidden_layers"])],
        rope_local_base_freq=GGUF_LOCAL_THETA,
        query_pre_attn_scalar=(hidden // heads if config["num_hidden_layers"]
                               == GGUF_27B_LAYERS else config["head_dim"]),
        final_logit_softcapping=model.arch_value("final_logit_softcapping"))
    return config

def gguf_metadata(args, hf_config: dict) -> dict:
    """The export's inverse of :func:`gguf_config`: the window, head size and norm keys
    llama.cpp reads; refuses a model whose global-layer pattern, local RoPE base or
    attention scalar differ from what llama.cpp's loader fixes (it would compute other
    logits)."""
    layers, hidden = hf_config["num_hidden_layers"], hf_config["hidden_size"]
    window = hf_config.get("sliding_window")
    head_dim = int(args.kv_channels)
    fixed = {
        "layer_types": [("sliding_attention" if window and (i + 1) % GGUF_PATTERN
                         else "full_attention") for i in range(layers)],
        "rope_local_base_freq": float(GGUF_LOCAL_THETA),
        "query_pre_attn_scalar": (hidden // args.num_attention_heads
                                  if layers == GGUF_27B_LAYERS else head_dim),
    }
    differ = [f"{key} {hf_config.get(key)!r} (llama.cpp: {value!r})"
              for key, value in fixed.items() if hf_config.get(key) != value]
    if differ:
        raise UnsupportedModelError(
            "llama.cpp's gemma3 loader fixes what this model sets otherwise: "
            + "; ".join(differ) + f" (a global layer every {GGUF_PATTERN}, local RoPE base "
            f"{GGUF_LOCAL_THETA:g}, the head size as attention scalar)")
    return {"attention.sliding_window": window, "attention.key_length": head_dim,
            "attention.value_length": head_dim,
            "final_logit_softcapping": hf_config.get("final_logit_softcapping")}


FAMILY = Family(
    name="gemma3",
    legacy_name="gemma3",  # Megatron-LLM has no Gemma: the legacy writer refuses it
    normalization="RMSNorm",
    swiglu=True,  # gated, with the activation below
    activation="gelu_tanh",
    position_embedding="rope",
    add_bias_linear=False,
    tie_embeddings=True,
    default_ffn_hidden_size=four_times_ffn_hidden_size,
    rope_theta=GLOBAL_THETA,
    layernorm_epsilon=1e-6,
    sliding_window=512,
    qk_layernorm=True,
    scale_embeddings=True,
    rope_scaling_types=("llama3", "linear"),
    settings=Settings,
    hf=Gemma3HF(),
    block_spec=block_spec,
    gguf=GGUFLayout("gemma3", MODEL_TYPE, ARCHITECTURE, norm_offset=1.0, config=gguf_config,
                    metadata=gguf_metadata),
)
