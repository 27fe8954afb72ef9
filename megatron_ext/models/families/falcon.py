"""Falcon: parallel attention and MLP, LayerNorm with bias, GeLU MLP of 4h, RoPE, multi-query
or grouped-query attention, tied embeddings.

Both Hugging Face architectures (``model_type: falcon``) are one family here:

* the 7B layout (``new_decoder_architecture: false``): one LayerNorm feeds attention and
  MLP; multi-query attention (one key/value head) or, without ``multi_query``, one
  key/value head per query head;
* the new decoder architecture (Falcon-40B/180B, Falcon2-11B): grouped-query attention
  with ``num_kv_heads`` groups and two LayerNorms (``ln_attn``, ``ln_mlp``), or one
  (``num_ln_in_parallel_attn: 1``).

What a model chooses is in its ``ModelArgs``: ``parallel_attn_norms`` (1 or 2),
``add_bias_linear`` (Hugging Face ``bias``: every linear layer has one or none),
``tie_embeddings``, the key/value heads.

Layer: megatron-core's ``TransformerLayer`` computes attention, adds the residual, then
the MLP of that sum; Falcon's layer is ``x + attention(norm_a(x)) + mlp(norm_m(x))``.
:func:`block_spec` keeps the shared seeded layer (:func:`~megatron_ext.models.builder.layer_spec`:
its norms, attention and per-layer seeding) and gives it that forward; with one norm the
MLP's norm is megatron-core's ``IdentityOp`` (no parameter: the unsharded and dist
checkpoints hold exactly the model's tensors). Sequence, tensor, pipeline and context
parallelism, activation recompute and the KV cache live inside the attention and MLP
modules or the block, which the layer calls as megatron-core's own layer does.

Fewer key/value heads than TP ranks (Falcon-7B has one) is megatron-core's: every rank
gathers the query/key/value projection's output and takes its group's heads.

Weights: Falcon's fused ``query_key_value`` rows are grouped per key/value head exactly as
megatron-core's ``linear_qkv`` (per group: its query heads, then its key head, then its
value head; with multi-query attention one group; without it, one query per group), so
no row moves. Checked against transformers' ``FalconAttention._split_heads``.

Refused by name: ALiBi (``alibi``), sequential layers (``parallel_attn: false``),
activations other than exact GeLU, RoPE scaling, the 7B layout with two norms (which
transformers itself cannot run), a key/value head count the 7B layout does not use.

Importing this file imports neither torch nor megatron-core (the registry lists the
families cheaply); the layer class is made on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Mapping, Optional

from megatron_ext.models.family import (
    Family,
    FamilySettings,
    GGUFLayout,
    UnsupportedModelError,
    four_times_ffn_hidden_size,
    setting,
)
from megatron_ext.models.hf_llama import config_tail, pad_vocab_rows, rope_settings

if TYPE_CHECKING:
    import torch

    from megatron_ext.models.config import ModelArgs


# ---------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings(FamilySettings):
    """What a Falcon model chooses: its norms per layer and whether its linear layers have
    biases (Hugging Face ``bias``; other families keep their ``Family.add_bias_linear``)."""

    add_bias_linear: bool = setting(
        False, "biases on every linear layer (Falcon's bias; default: the family's)",
        off=False, example=True, negations=("--disable_bias_linear",))
    # 1 = one norm feeds attention and MLP, 2 = a norm each; 0 (other families) = sequential
    # layers (norm, attention, residual, norm, MLP, residual)
    parallel_attn_norms: int = setting(
        1, "Falcon's parallel layers (attention and MLP read one input): 1 = one norm "
           "feeds both (Falcon-7B, Falcon2-11B), 2 = a norm each (Falcon-40B/180B); "
           "default: the family's", off=0, example=2)

    def problems(self, model: "ModelArgs") -> list[str]:
        if self.parallel_attn_norms not in (0, 1, 2):
            return [f"--parallel_attn_norms {self.parallel_attn_norms}: use 1 or 2"]
        return []

    def legacy_args(self, model: "ModelArgs") -> dict:
        # Megatron-LLM's parallel_layernorm: the MLP's own norm (mlp_layernorm)
        return {"parallel_layernorm": self.parallel_attn_norms == 2}

    @classmethod
    def from_legacy_args(cls, args: Mapping[str, Any]) -> dict:
        return {"parallel_attn_norms": 2 if args.get("parallel_layernorm") else 1}

    def legacy_problems(self, model: "ModelArgs") -> list[str]:
        if self.add_bias_linear:
            return ["linear biases in the falcon family (Megatron-LLM's Falcon asserts "
                    "use_bias=False)"]
        return []


# ---------------------------------------------------------------- the layer
@functools.cache
def _parallel_layer_mixin() -> type:
    """The forward of Falcon's parallel layer, as a ``TransformerLayer`` subclass that a
    block's seeded layer class is combined with (see :func:`block_spec`)."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.utils import deprecate_inference_params, make_viewless_tensor

    class ParallelAttentionMLP(TransformerLayer):
        """``x + attention(input_layernorm(x)) + mlp(pre_mlp_layernorm(x))``.

        ``pre_mlp_layernorm`` is an ``IdentityOp`` with one norm: the MLP then reads the
        attention's normalised input. The output biases of ``linear_proj`` and
        ``linear_fc2`` (megatron-core returns them apart) are added here. The branches
        are summed before the residual, as transformers sums them.

        Selective recompute: the attention core recomputes itself (megatron-core's
        default ``recompute_modules``); with ``mlp`` among them the MLP is recomputed as
        in megatron-core's layer. Norm recompute is not offered (the norms are run
        plainly). Hidden dropout applies to the branch sum (transformers' order).
        """

        def forward(self, hidden_states, attention_mask=None, context=None,
                    context_mask=None, rotary_pos_emb=None, rotary_pos_cos=None,
                    rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                    inference_context=None, packed_seq_params=None, sequence_len_offset=None,
                    padding_mask=None, *, inference_params=None,
                    dynamic_inference_decode_only=None):
            inference_context = deprecate_inference_params(inference_context, inference_params)
            residual = hidden_states
            attention_input = self.input_layernorm(hidden_states)
            attention_out, attention_bias_out = self.self_attention(
                attention_input,
                attention_mask=attention_mask,
                inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
            )
            # one norm: IdentityOp hands the input back, so normalise it only once
            mlp_input = (attention_input if self.parallel_attn_norms == 1
                         else self.pre_mlp_layernorm(hidden_states))
            if self.recompute_mlp:
                mlp_out, mlp_bias_out = tensor_parallel.checkpoint(
                    functools.partial(self.mlp, padding_mask=padding_mask), False, mlp_input)
            else:
                mlp_out, mlp_bias_out = self.mlp(mlp_input, padding_mask=padding_mask)
            if mlp_bias_out is not None:
                mlp_out = mlp_out + mlp_bias_out
            if attention_bias_out is not None:
                attention_out = attention_out + attention_bias_out
            branches = mlp_out + attention_out
            if self.hidden_dropout:
                branches = torch.nn.functional.dropout(branches, p=self.hidden_dropout,
                                                       training=self.training)
            output = residual + branches
            output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                          keep_graph=True)
            return output, context

    return ParallelAttentionMLP


def block_spec(config, init_seed: int, use_flash_attn: bool = False,
               model: Optional["ModelArgs"] = None):
    """The shared seeded block (:func:`~megatron_ext.models.builder.layer_spec`) with
    Falcon's parallel layers; ``model`` (resolved) says how many norms they have."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_ext.errors import ConfigError
    from megatron_ext.models.builder import layer_spec

    norms = (model or Settings()).parallel_attn_norms
    if norms not in (1, 2):
        raise ConfigError(f"--parallel_attn_norms {norms}: the falcon family's parallel "
                          "layers have 1 or 2 norms")
    block = layer_spec(config, init_seed, use_flash_attn)
    falcon = {}  # seeded layer class (made per build) -> it with this forward
    specs = []
    for spec in block.layer_specs:
        if spec.module not in falcon:  # the seeded layer's __init__, this forward
            falcon[spec.module] = type("FalconLayer", (_parallel_layer_mixin(), spec.module),
                                       {"parallel_attn_norms": norms})
        submodules = spec.submodules
        if norms == 1:
            submodules = dataclasses.replace(submodules, pre_mlp_layernorm=IdentityOp)
        specs.append(dataclasses.replace(spec, module=falcon[spec.module],
                                         submodules=submodules))
    return dataclasses.replace(block, layer_specs=specs)


# ---------------------------------------------------------------- Hugging Face
ACTIVATION = "gelu"  # transformers' "gelu": exact (erf) GeLU, megatron-core's F.gelu

EMBEDDINGS = "transformer.word_embeddings.weight"
FINAL_NORM = ("transformer.ln_f.weight", "transformer.ln_f.bias")
LM_HEAD = "lm_head.weight"

# megatron-core's linear layers (module path in a layer) -> Falcon's; one module each, rows
# in the same order (the fused query/key/value included)
LINEAR_NAMES: Mapping[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("self_attention.query_key_value",),
    "self_attention.linear_proj": ("self_attention.dense",),
    "mlp.linear_fc1": ("mlp.dense_h_to_4h",),
    "mlp.linear_fc2": ("mlp.dense_4h_to_h",),
}


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``config`` sets (Falcon's older configs say ``n_embed``,
    ``n_layer``, ``n_head``, ``n_head_kv``; transformers still reads ``n_embed``)."""
    return next((config[key] for key in keys if config.get(key) is not None), None)


def layout(config: Mapping[str, Any]) -> tuple[int, int]:
    """(key/value heads, norms per layer) of a Falcon ``config.json``, as transformers builds
    the model; raises on what transformers cannot run or this family cannot build."""
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_setting = _first(config, "num_kv_heads", "n_head_kv")
    norms_setting = config.get("num_ln_in_parallel_attn")
    if config.get("new_decoder_architecture"):
        kv = int(kv_setting or heads)
        norms = 2 if norms_setting is None else int(norms_setting)
        return kv, norms
    # the 7B layout: one norm; transformers runs two only in the new architecture
    norms = 1 if norms_setting is None else int(norms_setting)
    if config.get("multi_query", True):
        return 1, norms
    kv = int(kv_setting or heads)
    if kv != heads:  # transformers splits [q, k, v] per query head here
        raise UnsupportedModelError(
            f"num_kv_heads {kv} without multi_query or new_decoder_architecture (the 7B "
            f"layout then has one key/value head per query head, {heads})")
    return kv, norms


def model_args_from_falcon_config(config: Mapping[str, Any], model_name: str,
                                  source: str) -> dict:
    """``ModelArgs`` fields for a Falcon config; refuses what we cannot build exactly."""
    problems = []
    if config.get("alibi"):
        problems.append("alibi=true (ALiBi positions; only rotary Falcon models are built)")
    if config.get("parallel_attn") is False:
        problems.append("parallel_attn=false (sequential attention and MLP; Falcon's layers "
                        "here are parallel)")
    activation = config.get("activation", ACTIVATION)
    if activation != ACTIVATION:
        problems.append(f"activation {activation!r} (only exact GeLU, 'gelu', is built)")
    theta, scaling = rope_settings(config)
    if scaling:
        problems.append(f"rope_scaling {scaling} (only plain RoPE is built)")
    hidden = int(_first(config, "hidden_size", "n_embed"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    if hidden % heads:
        problems.append(f"hidden_size {hidden} is not divisible by {heads} heads")
    kv, norms = 1, 1
    try:
        kv, norms = layout(config)
    except UnsupportedModelError as error:
        problems.append(str(error))
    if norms not in (1, 2):
        problems.append(f"num_ln_in_parallel_attn {norms} (1 or 2 norms per layer)")
    elif norms == 2 and not config.get("new_decoder_architecture"):
        problems.append("num_ln_in_parallel_attn 2 without new_decoder_architecture "
                        "(transformers builds ln_attn/ln_mlp there but runs input_layernorm)")
    if kv and heads % kv:
        problems.append(f"{heads} heads are not divisible by num_kv_heads {kv}")
    if problems:
        raise UnsupportedModelError(f"{source}: cannot convert exactly: " + "; ".join(problems))
    positions = int(config.get("max_position_embeddings", 2048))
    return {
        "model_name": model_name,
        "num_layers": int(_first(config, "num_hidden_layers", "n_layer")),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_attention_heads_kv": kv,
        "ffn_hidden_size": int(config.get("ffn_hidden_size") or 4 * hidden),
        "seq_length": positions,
        "max_position_embeddings": positions,
        "rope_theta": theta,
        "layernorm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "kv_channels": hidden // heads,
        "add_bias_linear": bool(config.get("bias", False)),
        "parallel_attn_norms": norms,
        "init_method_std": float(config.get("initializer_range", 0.02)),
    }


def falcon_config_from_model_args(args: "ModelArgs", vocab_size: int,
                                  bos_token_id: Optional[int], eos_token_id: Any,
                                  pad_token_id: Optional[int], torch_dtype: str,
                                  max_position_embeddings: Optional[int] = None) -> dict:
    """``config.json`` for resolved ``args``.

    Two norms need the new decoder architecture. With one norm, the 7B layout is written
    when it can hold the heads (one key/value head: ``multi_query``; one per query head:
    without it), as Falcon-7B's own config is; otherwise the new architecture with
    ``num_ln_in_parallel_attn: 1`` (Falcon2-11B's). The tensors are the same either way.
    """
    problems = []
    if args.kv_channels * args.num_attention_heads != args.hidden_size:
        problems.append(f"head size {args.kv_channels} is not hidden size / heads")
    if args.rope_scaling_factor:
        problems.append(f"RoPE scaling (factor {args.rope_scaling_factor})")
    if args.attention_window:
        problems.append(f"a sliding window ({args.attention_window})")
    if problems:
        raise UnsupportedModelError("Falcon has no place for " + "; ".join(problems))
    heads, kv, norms = args.num_attention_heads, args.num_attention_heads_kv, \
        args.parallel_attn_norms
    new_architecture = norms == 2 or kv not in (1, heads)
    config = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": heads,
        # the 7B layout ignores it (one key/value head, or one per query head); transformers
        # then writes the heads, as FalconConfig defaults it
        "num_kv_heads": kv if new_architecture else heads,
        "ffn_hidden_size": args.ffn_hidden_size,
        "new_decoder_architecture": new_architecture,
        "multi_query": kv == 1 or new_architecture,  # ignored there: FalconConfig's default
        "parallel_attn": True,
        "alibi": False,
        "bias": bool(args.add_bias_linear),
        "activation": ACTIVATION,
        "layer_norm_epsilon": args.layernorm_epsilon,
        "max_position_embeddings": max_position_embeddings or args.max_position_embeddings,
        "rope_theta": float(args.rope_theta),
        "rope_parameters": {"rope_theta": float(args.rope_theta), "rope_type": "default"},
        "initializer_range": args.init_method_std,
        "vocab_size": vocab_size,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        **config_tail(bos_token_id, eos_token_id, pad_token_id, torch_dtype),
    }
    if new_architecture:
        config["num_ln_in_parallel_attn"] = norms
    return config


@dataclasses.dataclass(frozen=True)
class FalconHF:
    """:class:`~megatron_ext.models.family.HFAdapter` for ``FalconForCausalLM``.

    Names: ``transformer.h.N.self_attention.query_key_value`` <-> ``linear_qkv`` (rows as
    they are), ``self_attention.dense`` <-> ``linear_proj``, ``mlp.dense_h_to_4h`` <->
    ``linear_fc1``, ``mlp.dense_4h_to_h`` <-> ``linear_fc2`` (biases where the model has
    them); ``input_layernorm`` (one norm) or ``ln_attn``/``ln_mlp`` (two) <->
    ``input_layernorm``/``pre_mlp_layernorm``; ``transformer.ln_f`` <-> the final norm.

    Which tensors a layer has depends on the model (norms, biases), so the importer reads
    through :meth:`for_config`'s adapter, which knows them (``norms``, ``bias``); the
    family's own adapter (``norms`` None) lists one norm and no biases, enough to name a
    layer's linear modules. The export reads the layout from the tensors themselves.
    """

    norms: Optional[int] = None  # norms per layer; None: the family's adapter (unbound)
    bias: bool = False

    model_type = "falcon"
    linear_names = LINEAR_NAMES

    def for_config(self, config: Mapping[str, Any]) -> "FalconHF":
        """This adapter for the tensors of the model ``config`` describes (a config
        :meth:`model_args` accepts)."""
        return FalconHF(norms=layout(config)[1], bias=bool(config.get("bias", False)))

    def linear_rows_from_megatron(self, module: str, rows: "torch.Tensor", num_heads: int,
                                  num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        return {LINEAR_NAMES[module][0]: rows}

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == self.model_type

    def model_args(self, config: Mapping[str, Any], model_name: str, source: str) -> dict:
        return model_args_from_falcon_config(config, model_name, source)

    def hf_config(self, args: "ModelArgs", vocab_size: int, bos_token_id: Optional[int],
                  eos_token_id: Any, pad_token_id: Optional[int], torch_dtype: str,
                  max_position_embeddings: Optional[int] = None) -> dict:
        return falcon_config_from_model_args(args, vocab_size, bos_token_id, eos_token_id,
                                             pad_token_id, torch_dtype,
                                             max_position_embeddings)

    def embedding_names(self, tied: bool = False) -> list[str]:
        return [EMBEDDINGS, *FINAL_NORM, *(() if tied else (LM_HEAD,))]

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"transformer.h.{layer}."
        norms = [name for name, _ in norm_names(self.norms or 1)]
        linears = [module for modules in LINEAR_NAMES.values() for module in modules]
        kinds = ("weight", "bias") if self.bias else ("weight",)
        return ([f"{prefix}{norm}.{kind}" for norm in norms for kind in ("weight", "bias")]
                + [f"{prefix}{linear}.{kind}" for linear in linears for kind in kinds])

    def embeddings_to_megatron(self, hf: Mapping[str, "torch.Tensor"], tokenizer_vocab: int,
                               padded_vocab: int, tied: bool = False
                               ) -> dict[str, "torch.Tensor"]:
        """Word embeddings (vocabulary padded as for Llama: new rows = their mean), the final
        norm, the output layer unless tied (a tied model's word embeddings are its output)."""
        out = {"embedding.word_embeddings.weight":
               pad_vocab_rows(hf[EMBEDDINGS], tokenizer_vocab, padded_vocab),
               "decoder.final_layernorm.weight": hf[FINAL_NORM[0]],
               "decoder.final_layernorm.bias": hf[FINAL_NORM[1]]}
        if not tied:
            head = hf[LM_HEAD] if hf.get(LM_HEAD) is not None else hf[EMBEDDINGS]
            out["output_layer.weight"] = pad_vocab_rows(head, tokenizer_vocab, padded_vocab)
        return out

    def layer_to_megatron(self, hf: Mapping[str, "torch.Tensor"], layer: int, num_heads: int,
                          num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        src, dst = f"transformer.h.{layer}.", f"decoder.layers.{layer}."
        return {dst + ours: hf[src + theirs]
                for theirs, ours in layer_name_pairs(hf, src, from_hf=True)}

    def embeddings_from_megatron(self, state: Mapping[str, "torch.Tensor"], vocab_size: int,
                                 tied: bool = False) -> dict[str, "torch.Tensor"]:
        out = {EMBEDDINGS: state["embedding.word_embeddings.weight"][:vocab_size],
               FINAL_NORM[0]: state["decoder.final_layernorm.weight"],
               FINAL_NORM[1]: state["decoder.final_layernorm.bias"]}
        if not tied:
            out[LM_HEAD] = state["output_layer.weight"][:vocab_size]
        return {key: value.contiguous() for key, value in out.items()}

    def layer_from_megatron(self, state: Mapping[str, "torch.Tensor"], layer: int,
                            num_heads: int, num_kv_heads: int) -> dict[str, "torch.Tensor"]:
        src, dst = f"decoder.layers.{layer}.", f"transformer.h.{layer}."
        return {dst + theirs: state[src + ours].contiguous()
                for theirs, ours in layer_name_pairs(state, src, from_hf=False)}


def norm_names(norms: int) -> list[tuple[str, str]]:
    """(Falcon, megatron-core) names of a layer's norms: one feeds attention and MLP, or one
    each (megatron-core's ``pre_mlp_layernorm`` is the MLP's)."""
    if norms == 2:
        return [("ln_attn", "input_layernorm"), ("ln_mlp", "pre_mlp_layernorm")]
    return [("input_layernorm", "input_layernorm")]


def layer_name_pairs(tensors: Mapping[str, Any], prefix: str,
                     from_hf: bool) -> list[tuple[str, str]]:
    """(Falcon, megatron-core) names, without the layer prefix, of the layer whose tensors
    (Falcon's when ``from_hf``, else megatron-core's) are ``tensors`` under ``prefix``: its
    norms and biases are those present."""
    if from_hf:
        norms = 2 if f"{prefix}ln_attn.weight" in tensors else 1
        bias = f"{prefix}self_attention.query_key_value.bias" in tensors
    else:
        norms = 2 if f"{prefix}pre_mlp_layernorm.weight" in tensors else 1
        bias = f"{prefix}self_attention.linear_qkv.bias" in tensors
    pairs = [(f"{theirs}.{kind}", f"{ours}.{kind}") for theirs, ours in norm_names(norms)
             for kind in ("weight", "bias")]
    kinds = ("weight", "bias") if bias else ("weight",)
    pairs += [(f"{theirs[0]}.{kind}", f"{ours}.{kind}") for ours, theirs in LINEAR_NAMES.items()
              for kind in kinds]
    return pairs



# ---------------------------------------------------------------- GGUF (llama.cpp)
def gguf_config(model) -> dict:
    """Falcon's ``config.json`` from a GGUF file (``model``: the reader's
    ``GGUFModel``). llama.cpp stores the fused query/key/value matrix as all query heads,
    then all key heads, then all value heads (the reader regroups it), Falcon-40B's
    ``ln_attn`` as ``attn_norm_2`` and its ``ln_mlp`` as ``attn_norm``, and no RoPE base
    (its default, 10000, is the family's). The file says how many norms a layer has and
    how many key/value heads: one norm with one key/value head is Falcon-7B's layout, one
    norm with more the new architecture's single-norm variant (Falcon2-11B). llama.cpp
    computes the MLP with tanh-approximated GeLU; the import follows the original model
    (and transformers): exact GeLU."""
    from megatron_ext.models.hf_checkpoint import HFCheckpointError

    for name in ("token_embd.weight", "blk.0.attn_qkv.weight"):
        if not model.has_tensor(name):
            raise HFCheckpointError(f"{model.path} has no {name} tensor; it is incomplete "
                                    "or not a falcon model")
    hidden = int(model.arch_value("embedding_length", required=True))
    heads = int(model.arch_value("attention.head_count", required=True))
    kv = int(model.arch_value("attention.head_count_kv", 1))
    head_dim = hidden // heads
    rows = model.tensor_shape("blk.0.attn_qkv.weight")[0]
    if rows != (heads + 2 * kv) * head_dim:
        raise UnsupportedModelError(
            f"{model.path}: attn_qkv has {rows} rows, not ({heads} + 2 x {kv}) heads of "
            f"{head_dim}: the stated key/value heads are wrong (a converter reading "
            "Falcon-7B's num_kv_heads instead of multi_query?)")
    two_norms = model.has_tensor("blk.0.attn_norm_2.weight")
    new_architecture = two_norms or kv > 1
    config = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": hidden,
        "ffn_hidden_size": int(model.arch_value("feed_forward_length", 4 * hidden)),
        "num_hidden_layers": int(model.arch_value("block_count", required=True)),
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "new_decoder_architecture": new_architecture,
        "multi_query": kv == 1,
        "parallel_attn": True,
        "alibi": False,
        "bias": False,
        "activation": ACTIVATION,
        "layer_norm_epsilon": float(model.arch_value("attention.layer_norm_epsilon",
                                                     required=True)),
        "max_position_embeddings": int(model.arch_value("context_length", 2048)),
        "rope_theta": float(model.arch_value("rope.freq_base", FAMILY.rope_theta)),
        "vocab_size": model.tensor_shape("token_embd.weight")[0],
        "tie_word_embeddings": not model.has_tensor("output.weight"),
        "bos_token_id": model.value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model.value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": model.value("tokenizer.ggml.padding_token_id"),
    }
    if new_architecture:
        config["num_ln_in_parallel_attn"] = 2 if two_norms else 1
    return config

def gguf_metadata(args, hf_config: dict) -> dict:
    """The export's inverse of :func:`gguf_config`: LayerNorm's epsilon under llama.cpp's
    Falcon key, no RMS epsilon and no key/value lengths (llama.cpp derives the head size
    from the width)."""
    return {"attention.layer_norm_epsilon": float(args.layernorm_epsilon),
            "attention.layer_norm_rms_epsilon": None, "attention.key_length": None,
            "attention.value_length": None}


FAMILY = Family(
    name="falcon",
    legacy_name="falcon",  # Megatron-LLM's name; its reader refuses parallel_attn checkpoints
    normalization="LayerNorm",
    swiglu=False,
    activation="gelu",
    position_embedding="rope",
    add_bias_linear=False,  # Falcon-7B/40B/180B and Falcon2-11B have none
    tie_embeddings=True,
    default_ffn_hidden_size=four_times_ffn_hidden_size,
    rope_theta=10000.0,
    layernorm_epsilon=1e-5,
    parallel_layers=True,
    settings=Settings,
    block_spec=block_spec,
    hf=FalconHF(),
    gguf=GGUFLayout("falcon", "falcon", "FalconForCausalLM", split_qkv=True,
                    config=gguf_config, metadata=gguf_metadata),
)
