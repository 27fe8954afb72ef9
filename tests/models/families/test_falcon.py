"""The Falcon family end to end: tiny random ``FalconForCausalLM`` models of both
architectures imported, their logits at TP=1, TP=2, PP=2 (and TP=4) against transformers,
greedy generation at TP=1 and TP=2, training at TP=2 (sequence parallel), PP=2, CP=2 and
with full recompute on the serial curve, HF -> ours -> HF bit-exact, GGUF files, unsupported
options refused by name.

The models: the 7B layout (one LayerNorm, one key/value head: at TP=2 each rank shares
it, no biases, tied embeddings) and the new decoder architecture (``ln_attn``/``ln_mlp``,
two key/value heads, biases on every linear layer, untied), biases and norms perturbed so
that a wrong mapping shows. Every job of this module goes to the session's workers in one
launch per world size, side by side, started at the session's first test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpointing.hf_export import ExportConfig, export_hf
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.checkpointing.unsharded import UnshardedReader
from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.hf_config import model_args_from_hf_config
from tests.conftest import CHATML
from tests.models.check_hf_logits import perturb_biases_and_norms
from tests.runs import (
    call_job,
    job_logits,
    logits_job,
    model_args,
    start_runs,
    started,
    starts_early,
    train_metrics,
)
from tests.tools.conftest import assert_exported_as_source, hf_logits
from tests.training.test_parallel import assert_same_curve

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, layer_norm_epsilon=1e-5)
ARCHITECTURES = {
    "7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
               bias=False),
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2,
                bias=True, tie_word_embeddings=False),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
TRAIN_ITERS = 3
TRAIN_LAYOUTS = {  # name -> (architecture, extra flags, world size)
    "7b-serial": ("7b", [], 1),
    "7b-tp2-sp": ("7b", ["--tensor_model_parallel_size", "2", "--sequence_parallel"], 2),
    # the 40B runs packed (a sample is a row of several records), so that CP=2 runs rows
    # of several documents against the serial run of the same rows
    "40b-serial": ("40b", ["--pack_sequences"], 1),
    "40b-recompute-full": ("40b", ["--recompute_granularity", "full", "--pack_sequences"], 1),
    "40b-tp2": ("40b", ["--tensor_model_parallel_size", "2", "--pack_sequences"], 2),
    "40b-pp2": ("40b", ["--pipeline_model_parallel_size", "2", "--pack_sequences"], 2),
    "40b-cp2-packed": ("40b", ["--context_parallel_size", "2", "--pack_sequences"], 2),
}

TRAINED_LOGITS = {"7b-tp2-sp": (1, 2), "40b-pp2": (2, 1)}
"""Trained runs whose dist checkpoints are read back at another layout (TP/PP) and exported."""


def make_hf_falcon(directory: Path, architecture: str, vocab_size: int, bos: int | None,
                   eos: int, **overrides) -> Path:
    """Save a random ``FalconForCausalLM`` of ``architecture`` (no tokenizer)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(**{**SHAPE, **ARCHITECTURES[architecture],
                                          **overrides}, vocab_size=vocab_size,
                                       bos_token_id=bos, eos_token_id=eos)
    model = transformers.FalconForCausalLM(config)
    perturb_biases_and_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def falcon_with_sentencepiece(directory: Path, architecture: str, sp_model: str) -> Path:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    make_hf_falcon(directory, architecture, sp.get_piece_size(), sp.bos_id(), sp.eos_id())
    shutil.copy(sp_model, directory / "tokenizer.model")
    return directory


@starts_early("falcon_runs")
def start_falcon_runs(request) -> dict:
    """Both models imported (ChatML tokens added), then one launch per world size, started
    at the session's first test: logits at every layout, the generation checks
    (``tests/models/families/check_falcon.py``), the finetuning runs and, after them, the trained
    checkpoints' logits at another layout."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("falcon")
    sp_model = request.getfixturevalue("sp_model")
    imported_train_data = request.getfixturevalue("imported_train_data")
    sources = {name: falcon_with_sentencepiece(root / "hf" / name, name, sp_model)
               for name in ARCHITECTURES}
    for name, source in sources.items():
        import_hf(ImportConfig(str(source), str(root / "ckpt" / name),
                               vocab_extra_ids_list=",".join(CHATML), progress=False))
    torch.manual_seed(1)
    tokens = torch.randint(0, 1500, (2, 40))
    jobs = {(name, layout): logits_job(f"{name}_{layout}", root / "ckpt" / name, tokens,
                                       root / "logits", tp, pp)
            for name in ARCHITECTURES for layout, (tp, pp) in LAYOUTS.items()}
    checks = {tp: call_job(f"check_tp{tp}", "tests.models.families.check_falcon:main",
                           [str(root / f"check_tp{tp}.json")]) for tp in (1, 2)}
    train = {name: {"name": name, "argv": model_args(imported_train_data, TRAIN_ITERS) + [
        "--load", str(root / "ckpt" / architecture), "--finetune", "--use_checkpoint_args",
        "--save", str(root / "train" / name), *flags]}
        for name, (architecture, flags, _) in TRAIN_LAYOUTS.items()}

    # after training (a launch runs its jobs in order): trained checkpoints resharded
    trained = {name: logits_job(f"trained_{name}", root / "train" / name, tokens,
                                root / "logits", tp, pp)
               for name, (tp, pp) in TRAINED_LOGITS.items()}

    def world(size: int) -> list[dict]:
        return ([job for (_, layout), job in jobs.items() if (layout == "tp1") == (size == 1)]
                + [checks[size]]
                + [run for name, run in train.items() if TRAIN_LAYOUTS[name][2] == size]
                + (list(trained.values()) if size == 2 else []))

    # at TP=4: the 7B model's one key/value head serves four ranks
    tp4 = {name: logits_job(f"{name}_tp4", root / "ckpt" / name, tokens, root / "logits", 4, 1)
           for name in ARCHITECTURES}
    launches = [start_runs(size, world(size), root / f"world{size}", early=True)
                for size in (2, 1)]
    launches.append(start_runs(4, list(tp4.values()), root / "world4", early=True))
    return {"root": root, "sources": sources, "tokens": tokens, "jobs": jobs,
            "checks": checks, "train": train, "trained": trained, "tp4": tp4,
            "launches": launches}


@pytest.fixture(scope="module")
def falcon_runs(request) -> dict:
    begun = started("falcon_runs", request)
    root = begun["root"]
    results = {name: result for launch in begun["launches"]
               for name, result in launch.wait().items()}
    for name in begun["train"]:
        assert results[name].returncode == 0, results[name].log[-3000:]
    checked = {}
    for tp, job in begun["checks"].items():
        assert results[job["name"]].returncode == 0, results[job["name"]].log[-3000:]
        checked[tp] = json.loads((root / f"check_tp{tp}.json").read_text())
    return {"sources": begun["sources"], "tokens": begun["tokens"], "root": root,
            "checks": checked,
            "logits": {key: job_logits(results, job) for key, job in begun["jobs"].items()},
            "trained": {name: job_logits(results, job)
                        for name, job in begun["trained"].items()},
            "tp4": {name: job_logits(results, job) for name, job in begun["tp4"].items()}}


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_imported_falcon_reproduces_transformers_logits_at_tp1_tp2_pp2(falcon_runs,
                                                                      architecture):
    want = hf_logits(falcon_runs["sources"][architecture], falcon_runs["tokens"])
    for layout in LAYOUTS:
        got = falcon_runs["logits"][(architecture, layout)][..., :want.shape[-1]]
        assert close(got, want), (layout, (got - want).abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_imported_falcon_reproduces_transformers_logits_at_tp4(falcon_runs, architecture):
    """The 7B model's one key/value head serves all four ranks, the 40B model's two serve
    two ranks each."""
    want = hf_logits(falcon_runs["sources"][architecture], falcon_runs["tokens"])
    got = falcon_runs["tp4"][architecture][..., :want.shape[-1]]
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_imported_falcon_checkpoint_holds_the_models_tensors(falcon_runs, architecture):
    names = set(UnshardedReader(str(falcon_runs["root"] / "ckpt" / architecture)).names())
    layer = "decoder.layers.0."
    two_norms = architecture == "40b"
    assert (layer + "pre_mlp_layernorm.weight" in names) is two_norms  # IdentityOp otherwise
    assert (layer + "self_attention.linear_qkv.bias" in names) is two_norms  # its biases
    assert ("output_layer.weight" in names) is two_norms  # the 7B model ties its embeddings
    assert "decoder.final_layernorm.bias" in names


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["falcon-7b", "falcon-40b"])
def test_falcon_greedy_generation_equals_transformers_at_tp1_and_tp2(falcon_runs,
                                                                     architecture):
    one, two = falcon_runs["checks"][1][architecture], falcon_runs["checks"][2][architecture]
    for report in (one, two):
        assert report["ours"] == report["hf"]
        assert report["max_abs_diff"] < 1e-5 * max(1.0, report["scale"])  # full forward
        assert report["cache_vs_full_max_abs_diff"] < 1e-5 * max(1.0, report["logit_scale"])
        assert report["greedy_margin"] > 1e-4  # no near-tie makes the comparison luck
    assert two["ours"] == one["ours"]
    # not one token repeated (the tied random 7B model likes repeating a few: fine, the
    # margins above keep the comparison meaningful)
    assert all(len(set(tokens)) >= 2 for tokens in one["ours"])


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TRAIN_LAYOUTS if not name.endswith("serial")])
def test_falcon_training_equals_the_serial_run(falcon_runs, name):
    """TP=2 (with a single key/value head shared by both ranks, sequence parallel), PP=2,
    CP=2 (packed) and full activation recompute (the block re-runs Falcon's own layer
    forward) give the serial run's losses and gradient norms. (Data parallelism and
    selective recompute, inside megatron-core's attention, are the family's business no
    more than any other's: tests/training covers them.)"""
    serial = train_metrics(falcon_runs["root"] / "train" / f"{TRAIN_LAYOUTS[name][0]}-serial")
    assert len(serial) == TRAIN_ITERS and all(math.isfinite(r["loss"]) for r in serial)
    assert serial[-1]["loss"] < serial[0]["loss"]
    assert_same_curve(train_metrics(falcon_runs["root"] / "train" / name), serial)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a dist read in-process
@pytest.mark.parametrize("name", list(TRAINED_LOGITS))
def test_trained_falcon_exports_to_a_model_transformers_reproduces(falcon_runs, tmp_path,
                                                                   name):
    """A finetuned run's dist checkpoint, read at another layout (TP=2 <-> PP=2), gives the
    logits that transformers computes from its export; and it is not the imported model."""
    export_hf(ExportConfig(str(falcon_runs["root"] / "train" / name), str(tmp_path / "hf"),
                           dtype="fp32", progress=False))
    tokens = falcon_runs["tokens"]
    theirs = hf_logits(tmp_path / "hf", tokens)
    assert theirs.shape[-1] == 1500 + len(CHATML)  # padding removed, chat tokens kept
    assert close(falcon_runs["trained"][name][..., :theirs.shape[-1]], theirs)
    imported = hf_logits(falcon_runs["sources"][TRAIN_LAYOUTS[name][0]], tokens)
    assert (imported - theirs[..., :1500]).abs().max() > 1e-4


CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_kv_heads", "new_decoder_architecture", "multi_query", "parallel_attn",
               "bias", "alibi", "activation", "layer_norm_epsilon", "rope_parameters",
               "ffn_hidden_size", "vocab_size", "max_position_embeddings", "bos_token_id",
               "eos_token_id", "tie_word_embeddings")


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_hf_megatron_hf_gives_back_identical_tensors_and_config(tmp_path, architecture,
                                                                 hf_tokenizer_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    ids = tokenizer.get_vocab(with_added_tokens=True)
    source = make_hf_falcon(tmp_path / "hf", architecture,
                            tokenizer.get_vocab_size(with_added_tokens=True),
                            ids["<|begin_of_text|>"], ids["<|end_of_text|>"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{hf_tokenizer_dir}/{name}", source / name)
    import_hf(ImportConfig(str(source), str(tmp_path / "ckpt"), progress=False))
    export_hf(ExportConfig(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False))
    want = json.loads((source / "config.json").read_text())
    assert_exported_as_source(source, tmp_path / "back", CONFIG_KEYS + (
        ("num_ln_in_parallel_attn",) if want["new_decoder_architecture"] else ()))


BASE = {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 300}


@pytest.mark.parametrize("setting,named", [
    ({"alibi": True}, "alibi=true"),
    ({"parallel_attn": False}, "parallel_attn=false"),
    ({"activation": "gelu_new"}, "activation 'gelu_new'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn 2 without new_decoder"),
    ({"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 3},
     "num_ln_in_parallel_attn 3"),
    ({"multi_query": False, "num_kv_heads": 2}, "num_kv_heads 2 without multi_query"),
])
def test_unsupported_falcon_options_are_refused_by_name(setting, named):
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(")):
        model_args_from_hf_config({**BASE, **setting}, source="falcon/config.json")


def test_falcon_configs_read_as_transformers_builds_them():
    """Key/value heads and norms per layer of each Falcon layout (and the older key names
    of Falcon's first configs)."""
    def read(**setting):
        args = model_args_from_hf_config({**BASE, **setting})
        return args["num_attention_heads_kv"], args["parallel_attn_norms"]

    assert read() == (1, 1)  # Falcon-7B: multi_query is the default
    assert read(multi_query=False) == (4, 1)
    assert read(new_decoder_architecture=True, num_kv_heads=2) == (2, 2)  # Falcon-40B
    assert read(new_decoder_architecture=True, num_kv_heads=2,
                num_ln_in_parallel_attn=1) == (2, 1)  # Falcon2-11B
    old = {"model_type": "falcon", "n_embed": 64, "n_layer": 2, "n_head": 4}
    assert model_args_from_hf_config(old)["hidden_size"] == 64


def test_llama_export_refuses_what_its_layout_lacks():
    """A Llama-layout checkpoint with linear biases would export without them: refused."""
    from megatron_ext.models.hf_config import hf_config_from_model_args

    model = {"model_name": "llama2", "add_bias_linear": True}
    with pytest.raises(UnsupportedModelError, match="add_bias_linear"):
        hf_config_from_model_args(model, 300, 1, 2, None, "float32")


def test_falcon_adapters_export_under_falcons_module_names():
    """LoRA tensors of every linear layer land on Falcon's own modules, rows unsplit."""
    from megatron_ext.checkpointing.hf_peft import hf_adapter_tensors
    from megatron_ext.models.config import ModelArgs
    from megatron_ext.peft.adapters import ADAPTER

    model = ModelArgs(model_name="falcon", num_attention_heads_kv=1).resolved()
    rows = {"self_attention.linear_qkv": 96, "self_attention.linear_proj": 64,
            "mlp.linear_fc1": 256, "mlp.linear_fc2": 64}
    tensors = {}
    for module, out in rows.items():
        tensors[f"decoder.layers.1.{module}.{ADAPTER}.lora_A"] = torch.ones(4, 64)
        tensors[f"decoder.layers.1.{module}.{ADAPTER}.lora_B"] = torch.ones(out, 4)
    out, targets = hf_adapter_tensors(tensors, model)
    assert sorted(targets) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    prefix = "base_model.model.transformer.h.1."
    assert out[prefix + "self_attention.query_key_value.lora_B.weight"].shape == (96, 4)
    assert out[prefix + "mlp.dense_h_to_4h.lora_B.weight"].shape == (256, 4)


def write_falcon_gguf(path: Path, source: Path, tokenizer_file: Path,
                      stated_kv: int | None = None) -> Path:
    """``source`` (an HF Falcon directory without biases, 4h MLP) as llama.cpp's converter
    writes it: float32 tensors under GGUF names (``ln_attn`` -> ``attn_norm_2``, ``ln_mlp``
    -> ``attn_norm``), the fused query/key/value as all q, all k, all v heads, no output
    layer when tied, the key/value head count of the architecture, no RoPE base."""
    import gguf
    from safetensors.torch import load_file

    from tests.checkpointing.gguf_files import add_tokenizer, tokenizer_metadata, write_tensors

    config = json.loads((source / "config.json").read_text())
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = config["num_kv_heads"] if config["new_decoder_architecture"] else 1
    head_dim = hidden // heads
    vocab = tokenizer_metadata(tokenizer_file)
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_name("Tiny Falcon")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(4 * hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(stated_kv or kv)
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    add_tokenizer(writer, vocab)

    def llama_cpp_order(name: str, values: torch.Tensor) -> torch.Tensor:
        if not name.endswith("query_key_value.weight"):
            return values
        grouped = values.reshape(kv, heads // kv + 2, head_dim, hidden)
        return torch.cat([grouped[:, :-2].reshape(-1, hidden), grouped[:, -2].reshape(-1, hidden),
                          grouped[:, -1].reshape(-1, hidden)])

    tensors = {name: tensor for name, tensor in
               load_file(str(source / "model.safetensors")).items()
               if not (name == "lm_head.weight" and config["tie_word_embeddings"])}
    write_tensors(writer, tensors, gguf.MODEL_ARCH.FALCON, config["num_hidden_layers"],
                  llama_cpp_order)
    return path


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_gguf_import_reproduces_the_model(tmp_path, architecture, hf_tokenizer_dir):
    """A Falcon GGUF of each layout (40B's: two norms, two key/value heads regrouped from
    llama.cpp's q/k/v order) imports to the model transformers computes from the original
    directory (exact GELU, as the original)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    ids = tokenizer.get_vocab(with_added_tokens=True)
    source = make_hf_falcon(tmp_path / "hf", architecture,
                            tokenizer.get_vocab_size(with_added_tokens=True),
                            ids["<|begin_of_text|>"], ids["<|end_of_text|>"], bias=False)
    gguf_file = write_falcon_gguf(tmp_path / "tiny.gguf", source,
                                  Path(hf_tokenizer_dir) / "tokenizer.json")
    import_hf(ImportConfig(str(gguf_file), str(tmp_path / "ckpt"), progress=False))
    model = UnshardedReader(str(tmp_path / "ckpt")).run_config()["model"]
    assert (model["num_attention_heads_kv"], model["parallel_attn_norms"]) == (
        (2, 2) if architecture == "40b" else (1, 1))
    tokens = torch.randint(0, len(ids), (1, 30))
    job = logits_job("gguf", tmp_path / "ckpt", tokens, tmp_path / "logits")
    got = job_logits(start_runs(1, [job], tmp_path / "launch").wait(), job)
    assert close(got[..., :len(ids)], hf_logits(source, tokens))


def test_gguf_with_the_wrong_key_value_head_count_is_refused(tmp_path, hf_tokenizer_dir):
    """A 7B-layout file stating all heads as key/value heads (a converter that read
    num_kv_heads, which transformers saves equal to the heads, instead of multi_query)."""
    from megatron_ext.errors import UserError
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    ids = tokenizer.get_vocab(with_added_tokens=True)
    source = make_hf_falcon(tmp_path / "hf", "7b", len(ids), ids["<|begin_of_text|>"],
                            ids["<|end_of_text|>"])
    gguf_file = write_falcon_gguf(tmp_path / "tiny.gguf", source,
                                  Path(hf_tokenizer_dir) / "tokenizer.json", stated_kv=4)
    with pytest.raises(UserError, match=r"attn_qkv has 96 rows, not \(4 \+ 2 x 4\) heads"):
        import_hf(ImportConfig(str(gguf_file), str(tmp_path / "ckpt"), progress=False))
    assert not (tmp_path / "ckpt").exists()
