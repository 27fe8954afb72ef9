"""The Hugging Face Llama layout, shared by every Llama-like family (Llama 1/2/3,
CodeLlama, Mistral, Qwen2, Qwen3): ``config.json`` <-> ``ModelArgs`` and weights <->
megatron-core ``GPTModel`` (unsharded) weights.

Why one module: these families differ only in defaults and in which configs
are theirs; the config fields and the tensor layout are the same. A family
file states what is specific (its ``matches`` predicate, its ``model_type``,
whether it carries a window) by building a :class:`LlamaLikeHF`.

Config: anything our megatron-core spec cannot reproduce exactly (RoPE
scaling other than Llama 3.1's, biases the family's layout lacks, a sliding
window on some layers only) is refused with a clear message instead of being
converted into a model that silently computes something else. Tied
embeddings (``tie_word_embeddings``) and an explicit ``head_dim`` are the
model's own settings (``ModelArgs.tie_embeddings``, ``kv_channels``).

Weights: both directions work on *unsharded* state dicts (TP=PP=1 names and
shapes); sharding to any TP/PP is megatron-core ``dist_checkpointing``'s job.
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

torch is imported inside the functions that make tensors: family files import
this module, and listing the families must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from megatron_ext.models.family import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from megatron_ext.models.config import ModelArgs

# megatron-core's Llama 3.1 RoPE scaling has only the factor as a parameter
LLAMA3_SCALING_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192.0}


def rope_settings(config: Mapping[str, Any]) -> tuple[float, dict]:
    """(RoPE base, scaling settings) from either config layout.

    Older configs keep ``rope_theta`` and ``rope_scaling`` at the top level;
    transformers 5 writes one ``rope_parameters`` dict (``rope_type`` "default"
    meaning no scaling).
    """
    parameters = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta") or parameters.pop("rope_theta", None) or 10000.0
    scaling = dict(config.get("rope_scaling") or parameters)
    kind = scaling.get("rope_type") or scaling.get("type")
    return float(theta), ({} if kind in (None, "default") else scaling)


def rms_norm_eps(config: Mapping[str, Any]) -> float:
    return float(config.get("rms_norm_eps", 1e-5))


def window_layers(config: Mapping[str, Any]) -> Optional[list[bool]]:
    """Per layer, whether the sliding window applies, from Qwen's fields; None: no such fields.

    ``layer_types`` when the config lists it, else transformers' rule: the window
    applies with ``use_sliding_window`` to the layers from ``max_window_layers`` on.
    """
    layers = int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if kinds:
        return [kind == "sliding_attention" for kind in kinds]
    if "use_sliding_window" not in config and "max_window_layers" not in config:
        return None
    if not config.get("use_sliding_window") or config.get("sliding_window") is None:
        return [False] * layers
    first = int(config.get("max_window_layers", 0) or 0)
    return [i >= first for i in range(layers)]


def model_args_from_llama_config(config: Mapping[str, Any], model_name: str, source: str,
                                 windowed: bool, qkv_bias: bool = False,
                                 qk_norm: bool = False) -> dict:
    """``ModelArgs`` fields for a Llama-layout config; refuses what we cannot match.

    ``windowed``: the config's ``sliding_window`` is read (Mistral's and Qwen's
    layouts; Qwen's ``use_sliding_window``/``max_window_layers``/``layer_types``
    must put the window on every layer or on none). ``qkv_bias``: the layout has
    query/key/value biases (Qwen2), so ``attention_bias`` is not refused.
    ``qk_norm``: per-head query/key norms (Qwen3).
    """
    problems = []
    theta, rope_scaling = rope_settings(config)
    scaling_factor = None
    if rope_scaling:
        kind = rope_scaling.get("rope_type") or rope_scaling.get("type")
        if kind == "llama3" and all(float(rope_scaling.get(k, v)) == v for k, v in
                                    LLAMA3_SCALING_FIXED.items()):
            scaling_factor = float(rope_scaling["factor"])
        else:
            problems.append(f"rope_scaling {rope_scaling} (only plain RoPE and Llama 3.1-style "
                            f"scaling with {LLAMA3_SCALING_FIXED} are built)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag}=true (this layout has "
                            f"{'only query/key/value biases' if qkv_bias else 'no biases'})")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (SwiGLU uses silu)")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if not config.get("head_dim") and hidden % heads:
        problems.append(f"hidden_size {hidden} is not divisible by {heads} heads and the "
                        "config gives no head_dim")
    window = config.get("sliding_window") if windowed else None
    if config.get("use_sliding_window") is False:
        window = None
    per_layer = window_layers(config) if windowed else None
    if per_layer is not None:
        if all(per_layer):
            if not window:
                problems.append("layer_types asks for sliding attention but sliding_window is "
                                "not set")
        elif any(per_layer):
            problems.append(
                f"the sliding window applies to only {sum(per_layer)} of {len(per_layer)} "
                f"layers (use_sliding_window={config.get('use_sliding_window')}, "
                f"max_window_layers={config.get('max_window_layers')}, layer_types="
                f"{config.get('layer_types')}); only a window on every layer or on none is "
                "built")
        else:
            window = None
    if problems:
        raise UnsupportedModelError(f"{source}: cannot convert exactly: " + "; ".join(problems))
    return {
        **shape_args(config, model_name, 4096),
        "rope_theta": theta,
        "rope_scaling_factor": scaling_factor,
        "layernorm_epsilon": rms_norm_eps(config),
        "sliding_window_size": int(window) if window else 0,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "kv_channels": head_dim,
    }


def shape_args(config: Mapping[str, Any], model_name: str, default_positions: int) -> dict:
    """The ``ModelArgs`` fields a Llama-style config (Llama, Mistral, Qwen, Gemma) states
    alike: layers, widths, heads, positions (training length = the model's), init std."""
    heads = int(config["num_attention_heads"])
    positions = int(config.get("max_position_embeddings", default_positions))
    return {
        "model_name": model_name,
        "num_layers": int(config["num_hidden_layers"]),
        "hidden_size": int(config["hidden_size"]),
        "num_attention_heads": heads,
        "num_attention_heads_kv": int(config.get("num_key_value_heads") or heads),
        "ffn_hidden_size": int(config["intermediate_size"]),
        "seq_length": positions,
        "max_position_embeddings": positions,
        "init_method_std": float(config.get("initializer_range", 0.02)),
    }


def shape_config(args: "ModelArgs", vocab_size: int,
                 max_position_embeddings: Optional[int] = None) -> dict:
    """The ``config.json`` fields a Llama-style model (Llama, Mistral, Qwen, Gemma) states
    alike: the inverse of :func:`shape_args`, plus the vocabulary, norm epsilon, tied
    embeddings and no attention bias or dropout."""
    return {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads_kv,
        "head_dim": args.kv_channels,
        "max_position_embeddings": max_position_embeddings or args.max_position_embeddings,
        "rms_norm_eps": args.layernorm_epsilon,
        "initializer_range": args.init_method_std,
        "vocab_size": vocab_size,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
    }


def config_tail(bos_token_id: Optional[int], eos_token_id: Any, pad_token_id: Optional[int],
                torch_dtype: str) -> dict:
    """What every exported ``config.json`` states besides the architecture: special token
    ids, the weights' dtype (``torch_dtype`` for older readers, ``dtype`` for
    transformers >= 5) and ``use_cache``."""
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id, "torch_dtype": torch_dtype, "dtype": torch_dtype,
            "use_cache": True}


def llama_config_from_model_args(args: "ModelArgs", model_type: str, architecture: str,
                                 windowed: bool, vocab_size: int, bos_token_id: Optional[int],
                                 eos_token_id: Any, pad_token_id: Optional[int],
                                 torch_dtype: str,
                                 max_position_embeddings: Optional[int] = None,
                                 layer_window_fields: bool = False) -> dict:
    """``config.json`` for ``transformers`` from resolved model arguments."""
    if args.num_experts:  # a mixture of experts has no place in a dense layout
        raise UnsupportedModelError(
            f"the {args.model_name} model is a mixture of {args.num_experts} experts: the "
            f"Hugging Face {model_type} layout is dense (a family of mixtures of experts, "
            "e.g. mixtral or qwen3_moe, exports it)")
    given = [f"{name}={value}" for name, value in args.special_settings().items()]
    if given:  # the layout has no place for them: written anyway, they would be dropped
        raise UnsupportedModelError(
            f"the {args.model_name} model has family settings {', '.join(given)}: the Hugging "
            f"Face {model_type} layout has no place for them")
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        **shape_config(args, vocab_size, max_position_embeddings),
        "hidden_act": "silu",
        "rope_theta": float(args.rope_theta),
        **config_tail(bos_token_id, eos_token_id, pad_token_id, torch_dtype),
    }
    if layer_window_fields:  # the window on every layer (max_window_layers 0) or on none
        window = args.attention_window
        config.update(use_sliding_window=bool(window), sliding_window=window,
                      max_window_layers=0 if window else args.num_layers,
                      layer_types=[("sliding_attention" if window else "full_attention")
                                   for _ in range(args.num_layers)])
    elif windowed:
        config["sliding_window"] = args.attention_window
    else:
        config["mlp_bias"] = False
        config["pretraining_tp"] = 1
    # both layouts: transformers >= 5 reads rope_parameters, older readers (transformers 4,
    # llama.cpp, serving stacks) rope_theta, and would silently fall back to 10000 without it
    config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    if args.rope_scaling_factor:
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
                   **{k: (int(v) if k.startswith("original") else v)
                      for k, v in LLAMA3_SCALING_FIXED.items()}}
        config["rope_scaling"] = scaling
        config["rope_parameters"].update(scaling)
    return config



def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    num_kv_heads: int) -> torch.Tensor:
    """HF q, k, v (weights ``[rows, hidden]`` or biases ``[rows]``) -> one grouped tensor."""
    import torch  # here, not at the top: family files import this module (see above)

    head_dim = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    per_group = num_heads // num_kv_heads
    q = q.reshape(num_kv_heads, per_group, head_dim, *rest)
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    """Inverse of :func:`qkv_to_megatron` (weight or bias)."""
    per_group = num_heads // num_kv_heads
    rest = tuple(qkv.shape[1:])
    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    grouped = qkv.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return q, k, v


def pad_vocab_rows(weight: torch.Tensor, tokenizer_vocab: int, padded_vocab: int) -> torch.Tensor:
    """Rows for extra tokens = mean row; rows past the tokenizer = 0."""
    import torch  # here, not at the top: family files import this module (see above)

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
QKV_BIAS_SUFFIXES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QK_NORM_SUFFIXES = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
# HF per-head query/key norms <-> megatron-core's q_layernorm/k_layernorm
QK_NORM_NAMES = (("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
                 ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"))


def hf_layer_names(layer: int, qkv_bias: bool = False, qk_norm: bool = False) -> list[str]:
    """The HF tensors of decoder layer ``layer`` (what one conversion step reads)."""
    suffixes = (HF_LAYER_SUFFIXES + (QKV_BIAS_SUFFIXES if qkv_bias else ())
                + (QK_NORM_SUFFIXES if qk_norm else ()))
    return [f"model.layers.{layer}.{suffix}" for suffix in suffixes]


def layer_to_megatron(hf: Mapping[str, torch.Tensor], layer: int, num_heads: int,
                      num_kv_heads: int, qkv_bias: bool = False,
                      qk_norm: bool = False, mlp: bool = True) -> dict[str, torch.Tensor]:
    """One decoder layer, HF names -> megatron-core names (global layer number kept).

    The QKV bias is grouped per key/value head exactly like the QKV weight rows.
    ``mlp``: the layer has the dense MLP (a mixture of experts converts its own).
    """
    import torch  # here, not at the top: family files import this module (see above)

    src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    out = {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
        dst + "self_attention.linear_qkv.weight": qkv_to_megatron(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], num_heads, num_kv_heads),
        dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
    }
    if mlp:
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    if qkv_bias:
        out[dst + "self_attention.linear_qkv.bias"] = qkv_to_megatron(
            *(hf[src + suffix] for suffix in QKV_BIAS_SUFFIXES), num_heads, num_kv_heads)
    if qk_norm:
        for theirs, ours in QK_NORM_NAMES:
            out[dst + ours] = hf[src + theirs]
    return out


def layer_from_megatron(state: Mapping[str, torch.Tensor], layer: int, num_heads: int,
                        num_kv_heads: int, qkv_bias: bool = False,
                        qk_norm: bool = False, mlp: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_to_megatron`."""
    src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    q, k, v = qkv_from_megatron(state[src + "self_attention.linear_qkv.weight"], num_heads,
                                num_kv_heads)
    out = {
        dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
        dst + "self_attn.q_proj.weight": q,
        dst + "self_attn.k_proj.weight": k,
        dst + "self_attn.v_proj.weight": v,
        dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
        dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
    }
    if mlp:
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"]})
    if qkv_bias:
        biases = qkv_from_megatron(state[src + "self_attention.linear_qkv.bias"], num_heads,
                                   num_kv_heads)
        out.update({dst + suffix: bias for suffix, bias in zip(QKV_BIAS_SUFFIXES, biases)})
    if qk_norm:
        for theirs, ours in QK_NORM_NAMES:
            out[dst + theirs] = state[src + ours]
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
                      tie_embeddings: bool = False, qkv_bias: bool = False,
                      qk_norm: bool = False) -> dict[str, torch.Tensor]:
    """HF Llama-layout (Llama, Mistral, Qwen2, Qwen3) state dict to megatron-core names."""
    out = embeddings_to_megatron(hf, tokenizer_vocab, padded_vocab, tie_embeddings)
    for i in range(num_layers):
        out.update(layer_to_megatron(hf, i, num_heads, num_kv_heads, qkv_bias, qk_norm))
    return out


def megatron_to_llama(state: Mapping[str, torch.Tensor], num_layers: int, num_heads: int,
                      num_kv_heads: int, vocab_size: int, tie_embeddings: bool = False,
                      qkv_bias: bool = False, qk_norm: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`llama_to_megatron`; drops the vocabulary padding."""
    out = embeddings_from_megatron(state, vocab_size, tie_embeddings)
    for i in range(num_layers):
        out.update(layer_from_megatron(state, i, num_heads, num_kv_heads, qkv_bias, qk_norm))
    return out


EMBEDDING_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

# megatron-core's linear layers (module path in a layer) -> the HF modules they hold
LINEAR_NAMES: Mapping[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}


def linear_rows_from_megatron(module: str, rows: "torch.Tensor", num_heads: int,
                              num_kv_heads: int) -> dict[str, "torch.Tensor"]:
    """Rows of a megatron-core linear layer (its weight, or anything laid out like its
    output: an adapter's B, DoRA's magnitude) split into its HF modules' rows."""
    names = LINEAR_NAMES[module]
    if module.endswith("linear_qkv"):
        parts = qkv_from_megatron(rows, num_heads, num_kv_heads)
    elif module.endswith("linear_fc1"):
        parts = rows.chunk(2, dim=0)
    else:
        parts = (rows,)
    return dict(zip(names, parts))


@dataclass(frozen=True)
class LlamaLikeHF:
    """:class:`~megatron_ext.models.family.HFAdapter` for a family in the Llama layout.

    ``predicate`` is the family's own test of ``config.json`` (written in its file),
    None when every config of ``model_type`` is the family's; ``windowed`` says whether the config carries ``sliding_window``;
    ``qkv_bias`` and ``qk_norm`` add Qwen2's query/key/value biases and Qwen3's
    per-head query/key norms; ``layer_window_fields`` writes the window per layer on export
    (``use_sliding_window``, ``max_window_layers``, ``layer_types``: Qwen's fields) beside
    ``sliding_window``.
    Tied embeddings are the model's own choice (``tie_word_embeddings``): a tied
    model has no ``lm_head`` on either side.
    """

    model_type: str
    architecture: str
    predicate: Optional[Callable[[Mapping[str, Any]], bool]] = None
    windowed: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    layer_window_fields: bool = False

    @property
    def linear_names(self) -> Mapping[str, tuple[str, ...]]:
        return LINEAR_NAMES

    def linear_rows_from_megatron(self, module: str, rows: torch.Tensor, num_heads: int,
                                  num_kv_heads: int) -> dict[str, torch.Tensor]:
        return linear_rows_from_megatron(module, rows, num_heads, num_kv_heads)

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == self.model_type and (
            self.predicate is None or self.predicate(config))

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        return model_args_from_llama_config(config, model_name, source, self.windowed,
                                            self.qkv_bias, self.qk_norm)

    def hf_config(self, args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
                  eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
                  max_position_embeddings: Optional[int] = None) -> dict:
        config = llama_config_from_model_args(args, self.model_type, self.architecture,
                                              self.windowed, vocab_size, bos_token_id,
                                              eos_token_id, pad_token_id, torch_dtype,
                                              max_position_embeddings,
                                              layer_window_fields=self.layer_window_fields)
        if self.qkv_bias:  # Qwen2: no such fields, its q/k/v always have biases and its
            config.pop("attention_bias")  # head size is hidden/heads unless stated
            if args.kv_channels * args.num_attention_heads == args.hidden_size:
                config.pop("head_dim")
        return config

    def embedding_names(self, tied: bool = False) -> list[str]:
        return [name for name in EMBEDDING_NAMES if not (tied and name == "lm_head.weight")]

    def layer_names(self, layer: int) -> list[str]:
        return hf_layer_names(layer, self.qkv_bias, self.qk_norm)

    def embeddings_to_megatron(self, hf: Mapping[str, torch.Tensor], tokenizer_vocab: int,
                               padded_vocab: int, tied: bool = False
                               ) -> dict[str, torch.Tensor]:
        return embeddings_to_megatron(hf, tokenizer_vocab, padded_vocab, tied)

    def layer_to_megatron(self, hf: Mapping[str, torch.Tensor], layer: int, num_heads: int,
                          num_kv_heads: int) -> dict[str, torch.Tensor]:
        return layer_to_megatron(hf, layer, num_heads, num_kv_heads, self.qkv_bias,
                                 self.qk_norm)

    def embeddings_from_megatron(self, state: Mapping[str, torch.Tensor], vocab_size: int,
                                 tied: bool = False) -> dict[str, torch.Tensor]:
        return embeddings_from_megatron(state, vocab_size, tied)

    def layer_from_megatron(self, state: Mapping[str, torch.Tensor], layer: int,
                            num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
        return layer_from_megatron(state, layer, num_heads, num_kv_heads, self.qkv_bias,
                                   self.qk_norm)
