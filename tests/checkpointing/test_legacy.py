"""Megatron-LLM per-rank checkpoints: exact round trips, on-disk layout, same function, errors."""

from __future__ import annotations

import argparse
import enum
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.checkpointing import CheckpointError
from megatron_ext.checkpointing.legacy import (
    LegacyObject,
    megatron_to_legacy_shards,
    permute_rotary_rows,
    read_legacy_checkpoint,
    resolve_model_args,
    write_legacy_checkpoint,
)
from megatron_ext.models.hf_llama import llama_to_megatron, qkv_to_megatron
from tests.models.test_hf_weights import fake_llama_state

LAYERS, HEADS, KV, HIDDEN, FFN, VOCAB, PADDED = 4, 4, 2, 32, 24, 10, 16
HEAD_DIM = HIDDEN // HEADS

LLAMA_ARGS = {"model_name": "llama2", "num_layers": LAYERS, "hidden_size": HIDDEN,
              "num_attention_heads": HEADS, "num_attention_heads_kv": KV,
              "ffn_hidden_size": FFN, "seq_length": 32, "max_position_embeddings": 32,
              "rope_theta": 10000.0, "rope_scaling_factor": None, "layernorm_epsilon": 1e-5,
              "sliding_window_size": None, "init_method_std": 0.02,
              "make_vocab_size_divisible_by": 8, "tie_embeddings": False,
              "kv_channels": HEAD_DIM}
GPT_ARGS = {"model_name": "gpt", "num_layers": LAYERS, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "num_attention_heads_kv": HEADS,
            "ffn_hidden_size": 4 * HIDDEN, "seq_length": 24, "max_position_embeddings": 24,
            "rope_theta": 10000.0, "rope_scaling_factor": None, "layernorm_epsilon": 1e-5,
            "sliding_window_size": None, "init_method_std": 0.02,
            "make_vocab_size_divisible_by": 8, "tie_embeddings": True, "kv_channels": HEAD_DIM}


def llama_state() -> dict[str, torch.Tensor]:
    hf = fake_llama_state(layers=LAYERS, heads=HEADS, kv=KV, hidden=HIDDEN, ffn=FFN, vocab=VOCAB)
    return llama_to_megatron(hf, LAYERS, HEADS, KV, VOCAB, PADDED)


def gpt_state() -> dict[str, torch.Tensor]:
    """GPT family: LayerNorm with bias, linear biases, learned positions, tied embeddings."""
    g = torch.Generator().manual_seed(1)
    ffn, positions = GPT_ARGS["ffn_hidden_size"], GPT_ARGS["max_position_embeddings"]
    shapes = {"embedding.word_embeddings.weight": (PADDED, HIDDEN),
              "embedding.position_embeddings.weight": (positions, HIDDEN),
              "decoder.final_layernorm.weight": (HIDDEN,), "decoder.final_layernorm.bias": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "input_layernorm.bias": (HIDDEN,),
            p + "self_attention.linear_qkv.weight": (3 * HIDDEN, HIDDEN),
            p + "self_attention.linear_qkv.bias": (3 * HIDDEN,),
            p + "self_attention.linear_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attention.linear_proj.bias": (HIDDEN,),
            p + "pre_mlp_layernorm.weight": (HIDDEN,), p + "pre_mlp_layernorm.bias": (HIDDEN,),
            p + "mlp.linear_fc1.weight": (ffn, HIDDEN), p + "mlp.linear_fc1.bias": (ffn,),
            p + "mlp.linear_fc2.weight": (HIDDEN, ffn), p + "mlp.linear_fc2.bias": (HIDDEN,)})
    return {key: torch.randn(*shape, generator=g) for key, shape in shapes.items()}


FAMILIES = {"llama": (llama_state, LLAMA_ARGS), "gpt": (gpt_state, GPT_ARGS)}


def rank_file(root, iteration, tp_rank, pp_rank=None):
    name = f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(root, f"iter_{iteration:07d}", name, "model_optim_rng.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_write_read_round_trip_is_bit_exact(tmp_path, family, tp, pp):
    make, model_args = FAMILIES[family]
    state = make()
    final = write_legacy_checkpoint(str(tmp_path), state, model_args, tp, pp, 100, PADDED)
    assert final == str(tmp_path / "iter_0000100")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".incomplete", ".previous"))]
    got = read_legacy_checkpoint(str(tmp_path))
    assert_same_state(got.state, state)
    assert got.model_args == resolve_model_args(model_args)  # with the fields it leaves out
    assert (got.iteration, got.tp, got.pp, got.padded_vocab_size) == (100, tp, pp, PADDED)


def test_files_have_megatron_llm_names_and_rank_shapes(tmp_path):
    state = llama_state()
    write_legacy_checkpoint(str(tmp_path), state, LLAMA_ARGS, 2, 2, 100, PADDED,
                            extra_args={"tokenizer_type": "FalconTokenizer"})
    first = load(rank_file(tmp_path, 100, 0, 0))
    last = load(rank_file(tmp_path, 100, 1, 1))
    assert set(first) == {"args", "checkpoint_version", "iteration", "model"}  # no optimizer
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 100
    args = first["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.num_attention_heads, args.num_attention_heads_kv, args.padded_vocab_size) == \
        (HEADS, KV, PADDED)
    assert args.position_embedding_type == "rotary" and args.glu_activation == "swiglu"
    assert args.use_rms_norm and not args.tie_embed_logits and not args.use_bias
    assert args.params_dtype == torch.float32 and args.tokenizer_type == "FalconTokenizer"

    lm0, lm1 = first["model"]["language_model"], last["model"]["language_model"]
    assert set(lm0) == {"embedding", "encoder"} and set(lm1) == {"encoder", "lm_head"}
    assert lm0["embedding"]["word_embeddings"]["weight"].shape == (PADDED // 2, HIDDEN)
    assert lm1["lm_head"].shape == (PADDED // 2, HIDDEN)
    assert torch.equal(lm1["lm_head"], state["output_layer.weight"][PADDED // 2:])
    # pipeline stage 1 numbers its layers from 0 again and holds the final norm
    layers1 = {k.split(".")[1] for k in lm1["encoder"] if k.startswith("layers.")}
    assert layers1 == {"0", "1"} and "final_layernorm.weight" in lm1["encoder"]
    assert "final_layernorm.weight" not in lm0["encoder"]

    # TP rank 1 holds kv group 1: its 2 query heads, key, value; q/k rows interleaved
    qkv = lm1["encoder"]["layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == ((HEADS + 2 * KV) // 2 * HEAD_DIM, HIDDEN)
    ours = state["decoder.layers.2.self_attention.linear_qkv.weight"]
    group1 = ours[(HEADS // KV + 2) * HEAD_DIM:]
    half = HEAD_DIM // 2
    interleave = [a * half + j for j in range(half) for a in range(2)]  # row 2j+a <- a*d/2+j
    assert torch.equal(qkv[:HEAD_DIM], group1[:HEAD_DIM][interleave])  # a query head
    assert torch.equal(qkv[-HEAD_DIM:], group1[-HEAD_DIM:])  # the value head: not permuted

    # SwiGLU: each rank holds [up_r; gate_r]; ours is [gate; up]
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1[:FFN], fc1[FFN:]
    h4h = lm0["encoder"]["layers.0.mlp.dense_h_to_4h.weight"]
    assert torch.equal(h4h, torch.cat([up[:FFN // 2], gate[:FFN // 2]]))
    dense = lm1["encoder"]["layers.1.self_attention.dense.weight"]
    assert torch.equal(dense, state["decoder.layers.3.self_attention.linear_proj.weight"]
                       [:, HIDDEN // 2:])
    # each file stores only its slice, not the whole tensor it was cut from
    assert lm1["lm_head"].untyped_storage().nbytes() == lm1["lm_head"].numel() * 4


def test_tied_gpt_files(tmp_path):
    state = gpt_state()
    write_legacy_checkpoint(str(tmp_path), state, GPT_ARGS, 2, 2, 7, PADDED)
    first, last = load(rank_file(tmp_path, 7, 1, 0)), load(rank_file(tmp_path, 7, 1, 1))
    embedding = first["model"]["language_model"]["embedding"]
    assert torch.equal(embedding["position_embeddings"]["weight"],
                       state["embedding.position_embeddings.weight"])  # replicated
    # tied embeddings with PP>1: the last stage keeps its own copy for the output layer
    assert torch.equal(last["model"]["word_embeddings_for_head"]["weight"],
                       state["embedding.word_embeddings.weight"][PADDED // 2:])
    assert "lm_head" not in last["model"]["language_model"]
    encoder = last["model"]["language_model"]["encoder"]
    assert torch.equal(encoder["layers.0.self_attention.dense.bias"],
                       state["decoder.layers.2.self_attention.linear_proj.bias"])
    assert torch.equal(encoder["layers.0.mlp.dense_h_to_4h.bias"],
                       state["decoder.layers.2.mlp.linear_fc1.bias"][2 * HIDDEN:])
    args = first["args"]
    assert args.position_embedding_type == "absolute" and args.tie_embed_logits
    assert args.use_bias and not args.use_rms_norm and args.glu_activation is None
    assert args.bias_gelu_fusion is False  # exact GeLU, as megatron-core's


def test_reshard_tp2_pp2_to_tp1_gives_the_same_state(tmp_path):
    state = llama_state()
    write_legacy_checkpoint(str(tmp_path / "a"), state, LLAMA_ARGS, 2, 2, 100, PADDED)
    first = read_legacy_checkpoint(str(tmp_path / "a"))
    write_legacy_checkpoint(str(tmp_path / "b"), first.state, first.model_args, 1, 1,
                            first.iteration, first.padded_vocab_size)
    assert os.path.isfile(rank_file(tmp_path / "b", 100, 0))  # PP=1 names: mp_rank_00
    second = read_legacy_checkpoint(str(tmp_path / "b"))
    assert_same_state(second.state, state)
    assert (second.tp, second.pp) == (1, 1)


def test_rewrite_replaces_the_iteration_and_release_is_supported(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 5, PADDED)
    other = {k: v + 1 for k, v in llama_state().items()}
    write_legacy_checkpoint(str(tmp_path), other, LLAMA_ARGS, 2, 1, 5, PADDED)
    assert sorted(os.listdir(tmp_path / "iter_0000005")) == ["mp_rank_00", "mp_rank_01"]
    assert_same_state(read_legacy_checkpoint(str(tmp_path)).state, other)
    write_legacy_checkpoint(str(tmp_path), other, LLAMA_ARGS, 1, 1, "release", PADDED)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    got = read_legacy_checkpoint(str(tmp_path))
    assert got.iteration == "release" and load(tmp_path / "release/mp_rank_00/"
                                                "model_optim_rng.pt")["iteration"] == "release"
    assert read_legacy_checkpoint(str(tmp_path), iteration=5).tp == 2


def test_family_defaults_are_resolved_and_llama3_survives(tmp_path):
    args = {"model_name": "llama3", "num_layers": LAYERS, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "num_attention_heads_kv": KV, "ffn_hidden_size": FFN}
    write_legacy_checkpoint(str(tmp_path), llama_state(), args, 1, 2, 3, PADDED)
    got = read_legacy_checkpoint(str(tmp_path))
    assert got.model_args == resolve_model_args(args)
    assert got.model_args["model_name"] == "llama3" and got.model_args["rope_theta"] == 500000.0
    assert load(rank_file(tmp_path, 3, 0, 0))["args"].model_name == "llama2"  # Megatron-LLM's


# --- the converted weights compute the same function --------------------------------------


def meta_rotary(x, theta):
    """Megatron-LLM/Meta rotary: dims (2j, 2j+1) are one complex number, x[s, heads, d]."""
    seq, _, dim = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2).double() / dim)
    angles = torch.outer(torch.arange(seq).double(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    pairs = torch.view_as_complex(x.double().reshape(seq, x.shape[1], dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(2)


def core_rotary(x, theta, monkeypatch):
    """megatron-core's own rotate-half rotary (rotary_interleaved=False), x[s, heads, d]."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
    )
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )

    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    rope = RotaryEmbedding(kv_channels=x.shape[-1], rotary_percent=1.0, rotary_base=theta,
                           use_cpu_initialization=True)
    freqs = rope(x.shape[0]).double()
    return _apply_rotary_pos_emb_bshd(x.double()[:, None], freqs, rotary_interleaved=False)[:, 0]


def core_scores(qkv_weight, x, theta, monkeypatch):
    """Attention logits [heads, s, s] of our grouped layout with megatron-core's rotary."""
    per_group = HEADS // KV
    mixed = (x @ qkv_weight.T).view(x.shape[0], KV, per_group + 2, HEAD_DIM)
    q = core_rotary(mixed[:, :, :per_group].reshape(x.shape[0], HEADS, HEAD_DIM), theta,
                    monkeypatch)
    k = core_rotary(mixed[:, :, per_group], theta, monkeypatch).repeat_interleave(per_group, 1)
    return torch.einsum("shd,thd->hst", q, k)


def legacy_scores(rank_weights, x, theta):
    """The same logits computed the way Megatron-LLM does, one TP rank at a time."""
    per_group = HEADS // KV
    out = []
    for weight in rank_weights:
        mixed = (x @ weight.T).view(x.shape[0], -1, per_group + 2, HEAD_DIM)
        q = mixed[:, :, :per_group].reshape(x.shape[0], -1, HEAD_DIM)
        k = mixed[:, :, [per_group] * per_group].reshape(x.shape[0], -1, HEAD_DIM)
        out.append(torch.einsum("shd,thd->hst", meta_rotary(q, theta), meta_rotary(k, theta)))
    return torch.cat(out)


def test_interleaved_rotary_on_written_weights_matches_megatron_core(tmp_path, monkeypatch):
    state, theta = llama_state(), 10000.0
    write_legacy_checkpoint(str(tmp_path), state, LLAMA_ARGS, 2, 1, 1, PADDED)
    ranks = [load(rank_file(tmp_path, 1, r))["model"]["language_model"]["encoder"]
             ["layers.1.self_attention.query_key_value.weight"] for r in range(2)]
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(3))
    ours = core_scores(state["decoder.layers.1.self_attention.linear_qkv.weight"], x, theta,
                       monkeypatch)
    legacy = legacy_scores(ranks, x, theta)
    torch.testing.assert_close(legacy, ours.to(legacy.dtype), rtol=1e-5, atol=1e-5)
    # the check can fail: without the row permutation the logits are different
    unpermuted = state["decoder.layers.1.self_attention.linear_qkv.weight"].chunk(2, dim=0)
    assert not torch.allclose(legacy_scores(unpermuted, x, theta), legacy, atol=1e-3)


def test_rotary_permutation_round_trips_and_leaves_values():
    qkv = torch.randn((HEADS + 2 * KV) * HEAD_DIM, HIDDEN)
    bias = torch.randn((HEADS + 2 * KV) * HEAD_DIM)
    for tensor in (qkv, bias):
        there = permute_rotary_rows(tensor, HEADS, KV, to_interleaved=True)
        assert torch.equal(permute_rotary_rows(there, HEADS, KV, to_interleaved=False), tensor)
        assert not torch.equal(there, tensor)


def test_swiglu_halves_compute_the_same_mlp_at_tp2(tmp_path):
    state = llama_state()
    write_legacy_checkpoint(str(tmp_path), state, LLAMA_ARGS, 2, 1, 1, PADDED)
    encoders = [load(rank_file(tmp_path, 1, r))["model"]["language_model"]["encoder"]
                for r in range(2)]
    x = torch.randn(5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    legacy = 0
    for enc in encoders:  # Megatron-LLM: x1, x2 = chunk(h); x1 * silu(x2); row-parallel sum
        x1, x2 = (x @ enc["layers.0.mlp.dense_h_to_4h.weight"].double().T).chunk(2, dim=-1)
        legacy = legacy + (x1 * F.silu(x2)) @ enc["layers.0.mlp.dense_4h_to_h.weight"].double().T
    gate, up = state["decoder.layers.0.mlp.linear_fc1.weight"].double().chunk(2, dim=0)
    ours = (F.silu(x @ gate.T) * (x @ up.T)) @ state["decoder.layers.0.mlp.linear_fc2.weight"] \
        .double().T
    torch.testing.assert_close(legacy, ours)


# --- files as Megatron-LLM's own tools write them -----------------------------------------


def test_reads_hf_to_megatron_style_release_files(tmp_path):
    """hf_to_megatron.py's layout: 'transformer', '.attention.', flat embedding, no model_name."""
    hf = fake_llama_state(layers=LAYERS, heads=HEADS, kv=KV, hidden=HIDDEN, ffn=FFN,
                          vocab=PADDED)
    half = HEAD_DIM // 2

    def to_interleaved(weight):  # an independent spelling of HF -> Meta row order
        rows = []
        for head in weight.split(HEAD_DIM):
            for j in range(half):
                rows += [head[j], head[half + j]]
        return torch.stack(rows)

    transformer = {"final_layernorm.weight": hf["model.norm.weight"]}
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        q = to_interleaved(hf[src + "self_attn.q_proj.weight"])
        k = to_interleaved(hf[src + "self_attn.k_proj.weight"])
        transformer.update({
            dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
            dst + "attention.query_key_value.weight":
                qkv_to_megatron(q, k, hf[src + "self_attn.v_proj.weight"], HEADS, KV),
            dst + "attention.dense.weight": hf[src + "self_attn.o_proj.weight"],
            dst + "post_attention_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
            dst + "mlp.dense_h_to_4h.weight": torch.cat([hf[src + "mlp.up_proj.weight"],
                                                         hf[src + "mlp.gate_proj.weight"]]),
            dst + "mlp.dense_4h_to_h.weight": hf[src + "mlp.down_proj.weight"]})
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_attention_heads_kv=KV, ffn_hidden_size=FFN, parallel_attn=False,
        make_vocab_size_divisible_by=128, glu_activation="swiglu", padded_vocab_size=PADDED,
        use_rms_norm=True, tie_embed_logits=False, tokenizer_type="SentencePieceTokenizer",
        max_position_embeddings=4096, seq_length=4096, layernorm_epsilon=1e-5,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, iteration="release",
        bias_gelu_fusion=False, bias_droput_fusion=False, position_embedding_type="rotary")
    (tmp_path / "release" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"iteration": "release", "checkpoint_version": 3.0, "args": args,
                "model": {"language_model": {
                    "embedding": {"word_embeddings.weight": hf["model.embed_tokens.weight"]},
                    "transformer": transformer, "lm_head": hf["lm_head.weight"]}}},
               tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt")
    got = read_legacy_checkpoint(str(tmp_path))
    assert_same_state(got.state, llama_to_megatron(hf, LAYERS, HEADS, KV, PADDED, PADDED))
    assert got.model_args["model_name"] == "llama2"  # recognised from the architecture
    assert got.model_args["seq_length"] == 4096 and got.iteration == "release"


def test_enum_args_from_an_absent_module_are_read(tmp_path, monkeypatch):
    """Megatron-LLM pickles megatron.model.enums.PositionEmbeddingType, which we lack."""
    enums = types.ModuleType("megatron.model.enums")

    class PositionEmbeddingType(enum.Enum):
        rotary = 1
        absolute = 2

    PositionEmbeddingType.__module__ = "megatron.model.enums"
    PositionEmbeddingType.__qualname__ = "PositionEmbeddingType"
    enums.PositionEmbeddingType = PositionEmbeddingType
    monkeypatch.setitem(sys.modules, "megatron.model", types.ModuleType("megatron.model"))
    monkeypatch.setitem(sys.modules, "megatron.model.enums", enums)
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 2, PADDED)
    path = rank_file(tmp_path, 2, 0)
    saved = load(path)
    saved["args"].position_embedding_type = PositionEmbeddingType.rotary
    saved["args"].model_type = enums.PositionEmbeddingType.absolute  # any other enum too
    torch.save(saved, path)
    monkeypatch.delitem(sys.modules, "megatron.model.enums")
    monkeypatch.delitem(sys.modules, "megatron.model")
    got = read_legacy_checkpoint(str(tmp_path))
    assert isinstance(got.legacy_args["position_embedding_type"], LegacyObject)
    assert_same_state(got.state, llama_state())


def test_gpt_without_biases_reads_with_zero_biases(tmp_path):
    """Megatron-LLM's GPT defaults to no linear biases; ours has them: zeros are the same."""
    state = gpt_state()
    shards = megatron_to_legacy_shards(state, GPT_ARGS, 1, 1)
    encoder = shards[0][0]["language_model"]["encoder"]
    for key in [k for k in encoder if k.endswith(".bias") and "layernorm" not in k]:
        del encoder[key]
    args = argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              ffn_hidden_size=4 * HIDDEN, seq_length=24,
                              max_position_embeddings=24, padded_vocab_size=PADDED,
                              tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    (tmp_path / "iter_0000009" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("9")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 9, "model": shards[0][0]},
               rank_file(tmp_path, 9, 0))
    got = read_legacy_checkpoint(str(tmp_path))
    assert got.model_args["model_name"] == "gpt"
    assert not got.state["decoder.layers.0.mlp.linear_fc1.bias"].any()
    assert torch.equal(got.state["decoder.layers.0.mlp.linear_fc1.weight"],
                       state["decoder.layers.0.mlp.linear_fc1.weight"])


# --- refusals ----------------------------------------------------------------------------


def test_missing_rank_file_is_named(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 2, 1, 100, PADDED)
    missing = rank_file(tmp_path, 100, 1)
    os.remove(missing)
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt is missing"):
        read_legacy_checkpoint(str(tmp_path))
    os.rmdir(os.path.dirname(missing))  # the whole rank directory gone: args still say TP=2
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt is missing"):
        read_legacy_checkpoint(str(tmp_path))


def test_truncated_rank_file_is_named(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 2, 2, 100, PADDED)
    path = rank_file(tmp_path, 100, 1, 1)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model_optim_rng.pt cannot be "
                                              r"loaded.*truncated or corrupt"):
        read_legacy_checkpoint(str(tmp_path))


def test_shapes_that_disagree_across_ranks_are_refused(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 2, 1, 100, PADDED)
    path = rank_file(tmp_path, 100, 1)
    saved = load(path)
    encoder = saved["model"]["language_model"]["encoder"]
    encoder["layers.0.self_attention.dense.weight"] = \
        encoder["layers.0.self_attention.dense.weight"][:, :-1].clone()
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="layers.0.self_attention.dense.weight has "
                                              "different shapes"):
        read_legacy_checkpoint(str(tmp_path))


def test_missing_or_unexpected_keys_are_refused(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 100, PADDED)
    path = rank_file(tmp_path, 100, 0)
    saved = load(path)
    saved["model"]["language_model"]["encoder"]["layers.0.mlp_layernorm.weight"] = \
        torch.ones(HIDDEN)  # e.g. Falcon-40B's extra norm: refusing beats dropping it
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="unexpected.*mlp_layernorm"):
        read_legacy_checkpoint(str(tmp_path))


@pytest.mark.parametrize("tp,pp,message", [(3, 1, "4 attention heads are not divisible by TP=3"),
                                           (4, 1, "2 key/value heads are not divisible by TP=4"),
                                           (1, 3, "4 layers are not divisible by PP=3")])
def test_layouts_that_do_not_divide_are_refused(tmp_path, tp, pp, message):
    with pytest.raises(CheckpointError, match=message):
        write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, tp, pp, 1, PADDED)
    assert os.listdir(tmp_path) == []  # nothing written, no tracker


def test_bad_inputs_to_write_are_refused(tmp_path):
    state = llama_state()
    with pytest.raises(CheckpointError, match="padded_vocab_size=32"):
        write_legacy_checkpoint(str(tmp_path), state, LLAMA_ARGS, 1, 1, 1, 32)
    with pytest.raises(CheckpointError, match="unexpected.*stray"):
        write_legacy_checkpoint(str(tmp_path), {**state, "stray.weight": torch.ones(1)},
                                LLAMA_ARGS, 1, 1, 1, PADDED)
    with pytest.raises(CheckpointError, match="unknown model argument"):
        write_legacy_checkpoint(str(tmp_path), state, {**LLAMA_ARGS, "hiden_size": 3}, 1, 1, 1,
                                PADDED)
    with pytest.raises(CheckpointError, match="cannot change num_layers"):
        write_legacy_checkpoint(str(tmp_path), state, LLAMA_ARGS, 1, 1, 1, PADDED,
                                extra_args={"num_layers": 3})
    with pytest.raises(CheckpointError, match="shapes do not match"):
        write_legacy_checkpoint(str(tmp_path), state, {**LLAMA_ARGS, "ffn_hidden_size": 12},
                                1, 1, 1, PADDED)
    with pytest.raises(CheckpointError, match="does not match gpt"):
        write_legacy_checkpoint(str(tmp_path), state, {**LLAMA_ARGS, "model_name": "gpt",
                                                       "tie_embeddings": None},
                                1, 1, 1, PADDED)
    assert os.listdir(tmp_path) == []


def test_missing_tracker_and_iteration_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt is missing"):
        read_legacy_checkpoint(str(tmp_path))
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 1, PADDED)
    with pytest.raises(CheckpointError, match="iter_0000002 does not exist"):
        read_legacy_checkpoint(str(tmp_path), iteration=2)


def test_architectures_we_cannot_represent_are_refused(tmp_path):
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 1, PADDED)
    path = rank_file(tmp_path, 1, 0)
    saved = load(path)
    saved["args"].parallel_attn = True  # Falcon's layers, in a file that says llama2
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="parallel_attn: checkpoint True, llama2 False"):
        read_legacy_checkpoint(str(tmp_path))
    saved["args"].parallel_attn = False
    saved["args"].parallel_layernorm = True
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="parallel_layernorm=True without parallel_attn"):
        read_legacy_checkpoint(str(tmp_path))
    saved["args"].parallel_layernorm = False
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="does not have the gpt architecture"):
        read_legacy_checkpoint(str(tmp_path), model_name="gpt")


def test_llama31_rope_scaling_has_no_legacy_equivalent(tmp_path):
    args = dict(LLAMA_ARGS, model_name="llama3", rope_scaling_factor=8.0)
    with pytest.raises(CheckpointError, match="RoPE scaling"):
        write_legacy_checkpoint(str(tmp_path), llama_state(), args, 1, 1, 1, PADDED)


@pytest.mark.parametrize("changes,words", [
    # Megatron-LLM's Llama models assert untied embeddings (its GPT tied ones)
    ({"tie_embeddings": True}, "tied embeddings in the llama2 family"),
    ({"model_name": "qwen2"}, "query/key/value biases"),
    ({"model_name": "qwen3"}, "query/key norms"),
    ({"kv_channels": 2 * HEAD_DIM}, "head size"),
    ({"num_experts": 4}, "a mixture of 4 experts"),
])
def test_what_megatron_llm_cannot_build_is_not_written(tmp_path, changes, words):
    with pytest.raises(CheckpointError, match=words):
        write_legacy_checkpoint(str(tmp_path), llama_state(), dict(LLAMA_ARGS, **changes), 1, 1,
                                1, PADDED)
    assert not os.listdir(tmp_path)


# --- Falcon: Megatron-LLM's parallel layers -------------------------------------------------
FALCON = {  # HF config of Falcon-7B's layout (one norm, one key/value head) and Falcon-40B's
    "7b": dict(new_decoder_architecture=False, multi_query=True),
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),
}


def hf_falcon(layout: str):
    """A random ``FalconForCausalLM`` of ``layout`` (norms perturbed), no linear biases and
    tied embeddings, as Megatron-LLM's Falcon has them."""
    import transformers

    from tests.models.check_hf_logits import perturb_biases_and_norms

    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, vocab_size=PADDED, bias=False,
                                       parallel_attn=True, alibi=False, **FALCON[layout])
    model = transformers.FalconForCausalLM(config)
    perturb_biases_and_norms(model)
    return model


def megatron_llm_falcon_file(root, model, layout: str) -> None:
    """What Megatron-LLM's weights_conversion/hf_to_megatron.py writes for Falcon: one
    release file, 'transformer' / '.attention.' names, a flat embedding, q/k rows in
    interleaved rotary order (its permute_qkv), ``mlp_layernorm`` with parallel_layernorm,
    no lm_head (tied), and args without model_name."""
    hf, config = model.state_dict(), model.config
    kv = model.transformer.h[0].self_attention.num_kv_heads
    per_group, half = HEADS // kv, HEAD_DIM // 2

    def interleaved(qkv):  # per group: q heads and the k head reordered, v untouched
        groups = qkv.reshape(kv, per_group + 2, HEAD_DIM, -1).clone()
        for g in range(kv):
            for h in range(per_group + 1):
                head = groups[g, h].clone()
                for j in range(half):
                    groups[g, h, 2 * j], groups[g, h, 2 * j + 1] = head[j], head[half + j]
        return groups.reshape(qkv.shape)

    transformer = {"final_layernorm.weight": hf["transformer.ln_f.weight"],
                   "final_layernorm.bias": hf["transformer.ln_f.bias"]}
    two = layout == "40b"
    for i in range(LAYERS):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        norms = ({"input_layernorm": "ln_attn", "mlp_layernorm": "ln_mlp"} if two
                 else {"input_layernorm": "input_layernorm"})
        for ours, theirs in norms.items():
            for suffix in ("weight", "bias"):
                transformer[f"{dst}{ours}.{suffix}"] = hf[f"{src}{theirs}.{suffix}"]
        transformer.update({
            dst + "attention.query_key_value.weight":
                interleaved(hf[src + "self_attention.query_key_value.weight"]),
            dst + "attention.dense.weight": hf[src + "self_attention.dense.weight"],
            dst + "mlp.dense_h_to_4h.weight": hf[src + "mlp.dense_h_to_4h.weight"],
            dst + "mlp.dense_4h_to_h.weight": hf[src + "mlp.dense_4h_to_h.weight"]})
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_attention_heads_kv=kv, tokenizer_type="FalconTokenizer", use_flash_attn=True,
        hidden_dropout=0.0, parallel_attn=True, max_position_embeddings=2048,
        seq_length=2048, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        iteration="release", bias_gelu_fusion=False, bias_droput_fusion=False,
        position_embedding_type="rotary", **({"parallel_layernorm": True} if two else {}))
    (root / "release" / "mp_rank_00").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"iteration": "release", "checkpoint_version": 3.0, "args": args,
                "model": {"language_model": {
                    "embedding": {"word_embeddings.weight":
                                  hf["transformer.word_embeddings.weight"]},
                    "transformer": transformer}}},
               root / "release" / "mp_rank_00" / "model_optim_rng.pt")


def falcon_from_hf(model) -> dict[str, torch.Tensor]:
    """``model``'s weights in our names, converted by the falcon family's own HF adapter."""
    from megatron_ext.models.families import get_family

    config = model.config.to_dict()
    adapter = get_family("falcon").hf.for_config(config)
    hf = model.state_dict()
    kv = model.transformer.h[0].self_attention.num_kv_heads
    state = adapter.embeddings_to_megatron(
        {n: hf[n] for n in adapter.embedding_names(True)}, PADDED, PADDED, True)
    for i in range(LAYERS):
        state.update(adapter.layer_to_megatron({n: hf[n] for n in adapter.layer_names(i)}, i,
                                               HEADS, kv))
    return state


@pytest.mark.parametrize("layout", sorted(FALCON))
def test_reads_megatron_llm_falcon_files(tmp_path, layout):
    """Megatron-LLM's converter output is recognised as Falcon (its args name no model) and
    reads as the Hugging Face model our importer converts, rotary rows put back."""
    model = hf_falcon(layout)
    megatron_llm_falcon_file(tmp_path, model, layout)
    got = read_legacy_checkpoint(str(tmp_path))
    assert got.model_args["model_name"] == "falcon"
    assert got.model_args["parallel_attn_norms"] == (2 if layout == "40b" else 1)
    assert got.model_args["num_attention_heads_kv"] == (2 if layout == "40b" else 1)
    assert got.model_args["tie_embeddings"] and not got.model_args["add_bias_linear"]
    assert_same_state(got.state, falcon_from_hf(model))


@pytest.mark.parametrize("layout,tp,pp", [("7b", 1, 2), ("40b", 2, 2)])
def test_falcon_write_read_round_trip_is_bit_exact(tmp_path, layout, tp, pp):
    model = hf_falcon(layout)
    state = falcon_from_hf(model)
    kv = model.transformer.h[0].self_attention.num_kv_heads
    args = dict(LLAMA_ARGS, model_name="falcon", num_attention_heads_kv=kv,
                ffn_hidden_size=4 * HIDDEN, tie_embeddings=True,
                parallel_attn_norms=2 if layout == "40b" else 1)
    write_legacy_checkpoint(str(tmp_path), state, args, tp, pp, 10, PADDED)
    saved = load(rank_file(tmp_path, 10, 0, 0))
    assert saved["args"].parallel_attn and saved["args"].parallel_layernorm == (layout == "40b")
    assert saved["args"].model_name == "falcon" and not saved["args"].use_bias
    layer = saved["model"]["language_model"]["encoder"]
    assert ("layers.0.mlp_layernorm.bias" in layer) == (layout == "40b")
    assert "layers.0.post_attention_layernorm.weight" not in layer
    got = read_legacy_checkpoint(str(tmp_path))
    assert_same_state(got.state, state)
    assert got.model_args == resolve_model_args(args)


def test_falcon_with_linear_biases_is_not_written(tmp_path):
    args = dict(LLAMA_ARGS, model_name="falcon", add_bias_linear=True, tie_embeddings=True)
    with pytest.raises(CheckpointError, match="Megatron-LLM's Falcon asserts use_bias=False"):
        write_legacy_checkpoint(str(tmp_path), {}, args, 1, 1, 1, PADDED)
