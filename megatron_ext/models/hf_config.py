"""Hugging Face ``config.json`` <-> our ``ModelArgs`` for the Llama and Mistral families.

Why beside the weight map: the converters must agree with the model builder
on every architectural number (heads, groups, RoPE base, norm epsilon,
window). Anything our megatron-core spec cannot reproduce exactly (RoPE
scaling, biases, tied embeddings, a head size other than hidden/heads) is
refused here with a clear message instead of being converted into a model
that silently computes something else.
"""

from __future__ import annotations

from typing import Optional

from megatron_ext.errors import ConfigError
from megatron_ext.models.families import FAMILIES

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# megatron-core's Llama 3.1 RoPE scaling has only the factor as a parameter
LLAMA3_SCALING_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192.0}


class UnsupportedModelError(ConfigError):
    """A Hugging Face model this project cannot convert exactly."""


def rope_settings(config: dict) -> tuple[float, dict]:
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


def family_from_hf_config(config: dict) -> str:
    """Our ``--model_name`` for a config: Mistral by type; Llama 1/2/3/CodeLlama by RoPE/eps."""
    model_type = config.get("model_type")
    if model_type == "mistral":
        return "mistral"
    theta, _ = rope_settings(config)
    if abs(theta - 1e6) < 1.0:  # CodeLlama's base; Llama 3 uses 500000
        return "codellama"
    if theta >= 500000.0:
        return "llama3"
    if float(config.get("rms_norm_eps", 1e-5)) <= 1e-6:
        return "llama"
    return "llama2"


def model_args_from_hf_config(config: dict, model_name: Optional[str] = None,
                              source: str = "config.json") -> dict:
    """``ModelArgs`` fields for an HF Llama/Mistral config; refuses what we cannot match."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        architectures = ", ".join(config.get("architectures") or []) or "?"
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} ({architectures}) is not supported; this tool "
            f"converts {', '.join(HF_MODEL_TYPES)} (Llama 1/2/3, CodeLlama, Mistral)")
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
            problems.append(f"{flag}=true (the Llama spec has no biases)")
    if config.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true (Llama/Mistral here keep a separate output "
                        "layer)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (SwiGLU uses silu)")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    if problems:
        raise UnsupportedModelError(f"{source}: cannot convert exactly: " + "; ".join(problems))
    name = model_name or family_from_hf_config(config)
    if name not in FAMILIES or name == "gpt":
        raise UnsupportedModelError(f"--model_name {name!r} has no Hugging Face Llama/Mistral "
                                    "equivalent")
    window = config.get("sliding_window") if model_type == "mistral" else None
    if config.get("use_sliding_window") is False:
        window = None
    positions = int(config.get("max_position_embeddings", 4096))
    return {
        "model_name": name,
        "num_layers": int(config["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_attention_heads_kv": int(config.get("num_key_value_heads") or heads),
        "ffn_hidden_size": int(config["intermediate_size"]),
        "seq_length": positions,
        "max_position_embeddings": positions,
        "rope_theta": theta,
        "rope_scaling_factor": scaling_factor,
        "layernorm_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        "sliding_window_size": int(window) if window else 0,
        "init_method_std": float(config.get("initializer_range", 0.02)),
    }


def hf_config_from_model_args(model: dict, vocab_size: int, bos_token_id: Optional[int],
                              eos_token_id, pad_token_id: Optional[int], torch_dtype: str,
                              max_position_embeddings: Optional[int] = None) -> dict:
    """``config.json`` for ``transformers`` from a run's model arguments."""
    from megatron_ext.models.families import get_family, sliding_window
    from megatron_ext.training.config import ModelArgs

    args = ModelArgs(**{k: v for k, v in model.items() if k in ModelArgs.__dataclass_fields__})
    family = get_family(args.model_name)
    if args.model_name == "gpt":
        raise UnsupportedModelError("the gpt family has no Llama/Mistral Hugging Face "
                                    "equivalent; export supports the Llama and Mistral families")
    window = sliding_window(args)
    model_type = "mistral" if args.model_name == "mistral" else "llama"
    config = {
        "architectures": [HF_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size
        or family.default_ffn_hidden_size(args.hidden_size),
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads_kv or args.num_attention_heads,
        "head_dim": args.hidden_size // args.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings or args.max_position_embeddings
        or args.seq_length,
        "rms_norm_eps": args.layernorm_epsilon or family.layernorm_epsilon,
        "rope_theta": float(args.rope_theta or family.rope_theta),
        "initializer_range": args.init_method_std,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if model_type == "llama":
        config["mlp_bias"] = False
        config["pretraining_tp"] = 1
    else:
        config["sliding_window"] = window
    # both layouts: transformers >= 5 reads rope_parameters, older readers (transformers 4,
    # llama.cpp, serving stacks) rope_theta, and would silently fall back to 10000 without it
    config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    if args.rope_scaling_factor:
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
                   **{k: (int(v) if k.startswith("original") else v)
                      for k, v in LLAMA3_SCALING_FIXED.items()}}
        config["rope_scaling"] = scaling
        config["rope_parameters"].update(scaling)
    config["dtype"] = torch_dtype
    return config
