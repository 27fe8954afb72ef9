"""The LoRA/DoRA flags, target names, the fold of adapters into weights and the PEFT
layout's row split (in-process, no training)."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.errors import ConfigError
from megatron_ext.models.hf_llama import LINEAR_NAMES, qkv_from_megatron
from megatron_ext.peft.config import DEFAULT_TARGETS, PeftArgs, resolve_targets
from megatron_ext.training.arguments import build_parser, config_from_args

BASE = ["--data_path", "x", "--vocab_file", "tok.model", "--train_iters", "1"]


def config(*extra, world: int = 1):
    parsed = config_from_args(build_parser().parse_args([*BASE, *extra]))
    parsed.validate(world, model_shape=False)
    return parsed


def test_nemo_and_trl_spellings_set_the_same_fields():
    nemo = config("--load", "base", "--peft", "lora", "--peft-dim", "8", "--peft_alpha", "16",
                  "--peft_dropout", "0.1", "--peft_target_modules", "linear_qkv,linear_fc2",
                  "--lora_A_init", "xavier").peft
    trl = config("--load", "base", "--peft", "lora", "--lora_r", "8", "--lora_alpha", "16",
                 "--lora_dropout", "0.1", "--lora_target_modules", "linear_qkv",
                 "linear_fc2", "--lora-a-init", "xavier").peft
    assert nemo.target_names() == trl.target_names() == ("linear_qkv", "linear_fc2")
    assert (nemo.peft_dim, nemo.peft_alpha, nemo.peft_dropout, nemo.lora_A_init) == (
        trl.peft_dim, trl.peft_alpha, trl.peft_dropout, trl.lora_A_init) == (8, 16.0, 0.1,
                                                                             "xavier")
    assert nemo.scaling == 2.0
    defaults = config("--load", "base", "--peft", "dora").peft
    assert defaults.dora and defaults.peft_dim == 16 and defaults.peft_alpha == 32
    assert defaults.target_names() == DEFAULT_TARGETS


@pytest.mark.parametrize("extra, world, message", [
    (["--peft", "lora"], 1, "--peft lora needs --load: the base model"),
    (["--load", "b", "--peft", "lora", "--peft_dim", "6", "--tensor_model_parallel_size",
      "4"], 4, "--peft_dim 6 must be divisible by --tensor_model_parallel_size 4"),
    (["--load", "b", "--peft", "dora", "--peft_dropout", "1.5"], 1,
     "--peft_dropout must be in [0, 1)"),
    (["--load", "b", "--peft", "lora", "--peft_dim", "0"], 1, "--peft_dim must be positive"),
    # adapter settings without an adapter method did nothing (issue 20)
    (["--load", "b", "--lora_r", "8", "--lora_dropout", "0.1"], 1,
     "--peft_dim 8, --peft_dropout 0.1: adapter settings, which do nothing without --peft; "
     "add --peft lora (or --peft dora), or remove them"),
])
def test_bad_peft_flags_are_refused_before_any_work(extra, world, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        config(*extra, world=world)


def test_use_peft_is_trls_spelling_of_peft_lora():
    assert config("--load", "b", "--use_peft").peft.peft == "lora"
    assert config("--load", "b", "--use-peft", "--lora_r", "8").peft.peft_dim == 8


def test_unknown_method_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--peft", "qlora"])
    assert "invalid choice: 'qlora'" in capsys.readouterr().err


@pytest.mark.parametrize("names, want", [
    (("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), DEFAULT_TARGETS),
    (("q_proj",), ("linear_qkv",)),  # q_proj lives in the fused q/k/v layer
    (("q_proj", "v_proj"), ("linear_qkv",)),
    (("*_proj",), DEFAULT_TARGETS),
    (("gate_proj", "down_proj"), ("linear_fc1", "linear_fc2")),
    (("self_attn.o_proj",), ("linear_proj",)),
    (("mlp.*",), ("linear_fc1", "linear_fc2")),
    (("linear_fc*",), ("linear_fc1", "linear_fc2")),
])
def test_target_names_select_the_fused_layers(names, want):
    assert resolve_targets(names, LINEAR_NAMES) == want


def test_a_target_that_matches_nothing_is_an_error_listing_the_names():
    with pytest.raises(ConfigError) as error:
        resolve_targets(("linear_qkv", "query_key_value"), LINEAR_NAMES)
    message = str(error.value)
    assert "query_key_value: matches no layer" in message
    assert "q_proj" in message and "linear_fc2" in message
    # a family without a Hugging Face equivalent knows only megatron-core's names
    with pytest.raises(ConfigError, match="q_proj: matches no layer"):
        resolve_targets(("q_proj",), None)
    assert resolve_targets(("linear_proj",), None) == ("linear_proj",)


def test_settings_round_trip():
    args = PeftArgs(peft="dora", peft_dim=8, peft_alpha=4.0, peft_dropout=0.05,
                    lora_A_init="xavier")
    settings = args.settings(("linear_qkv", "linear_fc2"))
    again = PeftArgs.from_settings(settings)
    assert again.settings(("linear_qkv", "linear_fc2")) == settings


def test_merge_folds_lora_and_dora_and_survives_zero_rows():
    from megatron_ext.peft.merge import merge_group, merged_weight

    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    weight[2] = 0.0  # an all-zero row (pruned, or padding)
    a, b = torch.randn(3, 5), torch.randn(6, 3)
    b[2] = 0.0
    lora = merged_weight(weight, a, b, 2.0)
    torch.testing.assert_close(lora, weight + 2.0 * b @ a)
    magnitude = torch.rand(6) + 0.5
    magnitude[2] = 0.0
    dora = merged_weight(weight, a, b, 2.0, magnitude)
    assert torch.isfinite(dora).all() and dora[2].abs().max() == 0
    rows = weight + 2.0 * b @ a
    want = rows * (magnitude / rows.norm(dim=1).clamp_min(1e-12))[:, None]
    torch.testing.assert_close(dora, want)
    # the rows' norms become the magnitudes: what DoRA learns is direction and length apart
    torch.testing.assert_close(dora.norm(dim=1)[[0, 1, 3, 4, 5]], magnitude[[0, 1, 3, 4, 5]])
    prefix = "decoder.layers.0.mlp.linear_fc2"
    group = {f"{prefix}.weight": weight, "decoder.layers.0.mlp.linear_fc1.weight": weight}
    adapters = {f"{prefix}.adapter.lora_A": a, f"{prefix}.adapter.lora_B": b}
    merged = merge_group(group, adapters, 2.0)
    torch.testing.assert_close(merged[f"{prefix}.weight"], lora)
    assert merged["decoder.layers.0.mlp.linear_fc1.weight"] is weight  # not adapted


def test_peft_layout_splits_fused_rows_like_the_weights():
    """A fused adapter's B and magnitude split into q/k/v and gate/up rows exactly as the
    fused weights do (grouped-query heads: 4 query heads, 2 key/value heads of 8)."""
    from megatron_ext.checkpointing.hf_peft import hf_adapter_tensors
    from megatron_ext.models.config import ModelArgs

    model = ModelArgs(model_name="llama2", num_layers=1, hidden_size=32, num_attention_heads=4,
                      num_attention_heads_kv=2, ffn_hidden_size=48).resolved()
    qkv, fc1 = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc1"
    tensors = {f"{qkv}.adapter.lora_A": torch.randn(4, 32),
               f"{qkv}.adapter.lora_B": torch.randn(64, 4),
               f"{qkv}.adapter.magnitude": torch.rand(64),
               f"{fc1}.adapter.lora_A": torch.randn(4, 32),
               f"{fc1}.adapter.lora_B": torch.randn(96, 4),
               f"{fc1}.adapter.magnitude": torch.rand(96)}
    out, targets = hf_adapter_tensors(tensors, model)
    assert targets == ["gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"]
    q, k, v = qkv_from_megatron(tensors[f"{qkv}.adapter.lora_B"], 4, 2)
    prefix = "base_model.model.model.layers.0."
    for name, rows in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        assert torch.equal(out[f"{prefix}self_attn.{name}.lora_B.weight"], rows)
        assert torch.equal(out[f"{prefix}self_attn.{name}.lora_A.weight"],
                           tensors[f"{qkv}.adapter.lora_A"])
    gate, up = tensors[f"{fc1}.adapter.magnitude"].chunk(2)
    assert torch.equal(out[f"{prefix}mlp.gate_proj.lora_magnitude_vector"], gate)
    assert torch.equal(out[f"{prefix}mlp.up_proj.lora_magnitude_vector"], up)
