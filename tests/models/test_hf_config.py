"""HF config.json <-> ModelArgs: family detection, both RoPE layouts, refusals."""

from __future__ import annotations

import pytest

from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.hf_config import (
    family_from_hf_config,
    hf_config_from_model_args,
    model_args_from_hf_config,
)

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "vocab_size": 300}


@pytest.mark.parametrize("extra,family,theta", [
    ({"rope_theta": 10000.0}, "llama2", 10000.0),
    ({"rope_theta": 10000.0, "rms_norm_eps": 1e-6}, "llama", 10000.0),
    ({"rope_theta": 1e6}, "codellama", 1e6),
    ({"rope_theta": 500000.0}, "llama3", 500000.0),
    # transformers 5 layout
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, "llama3", 500000.0),
    ({"model_type": "mistral", "sliding_window": 4096}, "mistral", 10000.0),
])
def test_family_and_rope_base_from_either_layout(extra, family, theta):
    config = {**BASE, **extra}
    assert family_from_hf_config(config) == family
    args = model_args_from_hf_config(config)
    assert (args["model_name"], args["rope_theta"]) == (family, theta)


def test_mistral_without_window_keeps_none():
    args = model_args_from_hf_config({**BASE, "model_type": "mistral", "sliding_window": None})
    assert args["sliding_window_size"] == 0  # not the family default of 4096


@pytest.mark.parametrize("extra,words", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0}},
     "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2", "attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "max_window_layers": 1}, "sliding window applies to only 1 of 2 layers"),
    ({"model_type": "qwen3", "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention"]}, "only 1 of 2 layers"),
    ({"model_type": "gemma2"}, r"not supported; this tool converts falcon, gemma3_text, llama, "
                               r"mistral, mixtral, olmoe, qwen2, qwen3, qwen3_moe"),
    ({"model_type": "mixtral", "num_local_experts": 4, "router_jitter_noise": 0.1},
     "router_jitter_noise"),
    ({"model_type": "olmoe", "num_experts": 4, "clip_qkv": 8.0}, "clip_qkv"),
])
def test_what_cannot_be_converted_exactly_is_refused(extra, words):
    with pytest.raises(UnsupportedModelError, match=words):
        model_args_from_hf_config({**BASE, **extra})


def test_export_config_round_trips_through_the_import():
    config = {**BASE, "model_type": "mistral", "sliding_window": 16, "rope_theta": 1e6}
    args = model_args_from_hf_config(config)
    back = hf_config_from_model_args(args, 300, 1, 2, None, "float32")
    assert model_args_from_hf_config(back) == args


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
def test_llama31_rope_scaling_is_converted_both_ways(layout):
    config = {**BASE, "rope_theta": 500000.0}
    config[layout] = dict(LLAMA31, **({"rope_theta": 500000.0} if layout == "rope_parameters"
                                      else {}))
    args = model_args_from_hf_config(config)
    assert (args["model_name"], args["rope_scaling_factor"]) == ("llama3", 8.0)
    back = hf_config_from_model_args(args, 300, 1, 2, None, "bfloat16")
    assert back["rope_scaling"]["factor"] == 8.0 and back["rope_theta"] == 500000.0
    assert model_args_from_hf_config(back) == args


@pytest.mark.parametrize("extra,family", [
    ({}, "llama2"),  # Llama 3.2 1B/3B and SmolLM2 are Llama configs that tie
    ({"rope_theta": 500000.0, "rope_scaling": LLAMA31}, "llama3"),
    ({"model_type": "qwen2", "rope_theta": 1e6, "rms_norm_eps": 1e-6}, "qwen2"),
    ({"model_type": "qwen3", "rope_theta": 1e6, "rms_norm_eps": 1e-6, "head_dim": 32},
     "qwen3"),
])
@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_and_head_dim_are_the_models_own(extra, family, tied):
    config = {**BASE, **extra, "tie_word_embeddings": tied}
    args = model_args_from_hf_config(config)
    assert (args["model_name"], args["tie_embeddings"]) == (family, tied)
    assert args["kv_channels"] == extra.get("head_dim", 16)
    back = hf_config_from_model_args(args, 300, 1, 2, None, "float32")
    assert back["tie_word_embeddings"] is tied
    assert back.get("head_dim", 16) == args["kv_channels"]  # Qwen2 writes none when 64/4
    assert back["model_type"] == config["model_type"]
    assert model_args_from_hf_config(back) == args


@pytest.mark.parametrize("window", [
    {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2},  # past the end
    {"layer_types": ["full_attention", "full_attention"]},
])
def test_qwen_window_on_no_layer_is_no_window(window):
    args = model_args_from_hf_config({**BASE, "model_type": "qwen2", **window})
    assert args["sliding_window_size"] == 0


def test_qwen_window_on_every_layer_round_trips():
    config = {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
              "max_window_layers": 0}
    args = model_args_from_hf_config(config)
    assert args["sliding_window_size"] == 16
    back = hf_config_from_model_args(args, 300, 1, 2, None, "float32")
    assert (back["use_sliding_window"], back["sliding_window"], back["max_window_layers"]) == (
        True, 16, 0)
    assert "attention_bias" not in back  # Qwen2's biases are not optional
    assert model_args_from_hf_config(back) == args


# config.json of real small models (architecture fields as published)
LLAMA32_1B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 131072,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192,
                               "rope_type": "llama3"},
              "tie_word_embeddings": True, "vocab_size": 128256, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False}
SMOLLM2_135M = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000,
                "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "vocab_size": 49152, "hidden_act": "silu"}
QWEN25_05B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "max_position_embeddings": 32768, "tie_word_embeddings": True,
              "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
              "vocab_size": 151936, "hidden_act": "silu"}
QWEN3_06B = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000, "max_position_embeddings": 40960,
             "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
             "sliding_window": None, "max_window_layers": 28, "vocab_size": 151936,
             "hidden_act": "silu"}


@pytest.mark.parametrize("config,want", [
    (LLAMA32_1B, dict(model_name="llama3", rope_scaling_factor=32.0, kv_channels=64)),
    (SMOLLM2_135M, dict(model_name="llama2", rope_theta=100000.0, kv_channels=64)),
    (QWEN25_05B, dict(model_name="qwen2", sliding_window_size=0, kv_channels=64)),
    (QWEN3_06B, dict(model_name="qwen3", sliding_window_size=0, kv_channels=128)),
], ids=["llama3.2-1b", "smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b"])
def test_popular_small_models_are_read_tied(config, want):
    args = model_args_from_hf_config(config)
    assert args["tie_embeddings"] is True
    assert {key: args[key] for key in want} == want
    back = hf_config_from_model_args(args, config["vocab_size"], 1, 2, None, "bfloat16")
    assert model_args_from_hf_config(back) == args


def test_model_name_override_must_keep_the_layer_layout():
    assert model_args_from_hf_config(BASE, "llama3")["model_name"] == "llama3"
    with pytest.raises(UnsupportedModelError, match="another layer layout.*qk_layernorm"):
        model_args_from_hf_config(BASE, "qwen3")
    with pytest.raises(UnsupportedModelError, match="add_qkv_bias"):
        model_args_from_hf_config({**BASE, "model_type": "qwen2"}, "llama2")
