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
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"model_type": "qwen2"}, "not supported"),
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
