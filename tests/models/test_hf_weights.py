"""Hugging Face Llama/Mistral weights in megatron-core: exact layout and logits parity."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.models.hf_llama import (
    llama_to_megatron,
    megatron_to_llama,
    pad_vocab_rows,
    qkv_from_megatron,
    qkv_to_megatron,
)
from tests.models.check_hf_logits import VARIANTS
from tests.runs import call_job, start_runs, started, starts_early


def fake_llama_state(layers=2, heads=4, kv=2, hidden=16, ffn=24, vocab=10):
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
             "model.norm.weight": torch.randn(hidden, generator=g),
             "lm_head.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                  "self_attn.q_proj.weight": (heads * head_dim, hidden),
                  "self_attn.k_proj.weight": (kv * head_dim, hidden),
                  "self_attn.v_proj.weight": (kv * head_dim, hidden),
                  "self_attn.o_proj.weight": (hidden, hidden),
                  "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                  "mlp.down_proj.weight": (hidden, ffn)}
        state.update({p + k: torch.randn(*s, generator=g) for k, s in shapes.items()})
    return state


def test_hf_megatron_hf_round_trip_is_exact():
    hf = fake_llama_state()
    back = megatron_to_llama(llama_to_megatron(hf, 2, 4, 2, 10, 16), 2, 4, 2, 10)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_rows_are_grouped_per_kv_head():
    q = torch.arange(4 * 2).float().view(4 * 2, 1)  # 4 heads of dim 2
    k = 100 + torch.arange(2 * 2).float().view(2 * 2, 1)
    v = 200 + torch.arange(2 * 2).float().view(2 * 2, 1)
    fused = qkv_to_megatron(q, k, v, num_heads=4, num_kv_heads=2).flatten().tolist()
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert all(torch.equal(a, b) for a, b in zip(qkv_from_megatron(
        qkv_to_megatron(q, k, v, 4, 2), 4, 2), (q, k, v)))


def test_new_token_rows_start_at_the_mean_and_padding_at_zero():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    padded = pad_vocab_rows(weight, tokenizer_vocab=3, padded_vocab=5)
    assert padded.tolist() == [[1, 2], [3, 4], [2, 3], [0, 0], [0, 0]]
    with pytest.raises(ValueError):
        pad_vocab_rows(weight, 2, 1)


# tied Llama, Qwen2 (tied, QKV biases) and Qwen3 (q/k norms, head_dim 32 != 64/4) beside them
FAMILIES = ("llama", "mistral", *VARIANTS)


def _start(root, mode: str, nproc: int):
    return start_runs(nproc, [call_job(mode, "tests.models.check_hf_logits:main",
                                       [mode, str(root), *FAMILIES])], root / mode, early=True)


def _reports(launch, mode: str) -> dict:
    """{(family, mode): its JSON report} from a finished check_hf_logits.py job."""
    lines = launch.wait()[mode].stdout.splitlines()
    return {(line["family"], mode): line
            for line in map(json.loads, filter(lambda line: line.startswith("{"), lines))}


@starts_early("logits_checks")
def start_conversions(request):
    """check_hf_logits.py's conversions (one process): they need nothing, so start early."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("hf_weights")
    return root, _start(root, "convert", 1)


@pytest.fixture(scope="module")
def logits_checks(request) -> dict:
    """check_hf_logits.py: every family's conversion in one process, then every family's
    TP=2 check in two (the session's run_many.py workers). {(family, mode): its JSON
    report}."""
    root, convert = started("logits_checks", request)
    results = _reports(convert, "convert")
    results.update(_reports(_start(root, "check", 2), "check"))
    assert set(results) == {(f, m) for f in FAMILIES for m in ("convert", "check")}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_reproduces_transformers_logits_at_tp1_and_tp2(logits_checks, family):
    for mode in ("convert", "check"):  # TP=1 (converted here), then TP=2 (loaded)
        result = logits_checks[(family, mode)]
        assert result["max_abs_diff"] < 1e-5 * max(1.0, result["scale"]), result
        if family == "mistral" and mode == "convert":
            assert result["diff_without_window"] > 1e-3  # the sliding window is exercised


def test_qkv_bias_and_qk_norms_round_trip_exactly():
    hf = fake_llama_state()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        hf.update({p + "q_proj.bias": torch.randn(16, generator=g),
                   p + "k_proj.bias": torch.randn(8, generator=g),
                   p + "v_proj.bias": torch.randn(8, generator=g),
                   p + "q_norm.weight": torch.randn(4, generator=g),
                   p + "k_norm.weight": torch.randn(4, generator=g)})
    del hf["lm_head.weight"]  # tied
    ours = llama_to_megatron(hf, 2, 4, 2, 10, 16, True, qkv_bias=True, qk_norm=True)
    assert "output_layer.weight" not in ours
    # the bias is grouped per key/value head exactly like the weight rows
    weight = ours["decoder.layers.0.self_attention.linear_qkv.weight"]
    bias = ours["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert torch.equal(bias, qkv_to_megatron(*(hf[f"model.layers.0.self_attn.{x}_proj.bias"]
                                               for x in "qkv"), 4, 2))
    assert bias.shape[0] == weight.shape[0]
    back = megatron_to_llama(ours, 2, 4, 2, 10, True, qkv_bias=True, qk_norm=True)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
