"""Gemma 3 (text): imported logits equal transformers at TP=1/2/4 and PP=2 (one key/value
head, so TP>1 shares it), greedy generation at TP=1 and TP=2, HF -> ours -> HF bit-exact,
finetuned at TP=2 (LoRA; all weights with sequence parallelism) and exported to what
transformers and peft compute as we do, GGUF files, and configs that cannot be built
exactly refused by name.

The tiny model has what sets Gemma 3 apart in a form that a wrong mapping cannot hide:
four layers alternating sliding-window (8 tokens) and global attention, each kind with
its own RoPE base, linear RoPE scaling on the global layers, a head size (32) and an
attention scalar (24) that are not hidden / heads, perturbed ``1 + w`` norms, tied and
sqrt(hidden)-scaled embeddings, and a single key/value head. Training at TP=2 / PP=2
against the serial run is tests/training/test_parallel.py's ``gemma3`` variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpointing.hf_export import ExportConfig, export_hf
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.errors import UserError
from tests.models.check_hf_logits import perturb_biases_and_norms
from tests.conftest import CHATML
from tests.runs import (
    call_job,
    job_logits,
    logits_job,
    start_runs,
    started,
    starts_early,
    tool_job,
)
from tests.tools.conftest import assert_exported_as_source, hf_logits

LAYOUTS = ((1, 1), (2, 1), (4, 1), (1, 2))
PROMPT_LENGTHS = (5, 11)
NEW_TOKENS = 20  # prompt + generation > 3 windows of 8
# finetuned at TP=2 from the HF directory, then exported: a LoRA on every linear layer (the
# shared key/value head's adapter too), and all weights with sequence parallelism
TRAINED = {"lora": ("--peft", "lora"), "full": ("--sequence_parallel",)}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, sliding_window=8, sliding_window_pattern=2,
            query_pre_attn_scalar=24, max_position_embeddings=256, initializer_range=0.05,
            rope_scaling={"rope_type": "linear", "factor": 2.0})


def make_gemma3(directory: Path, sp_model: str, **overrides) -> Path:
    """A random ``Gemma3ForCausalLM`` (norms perturbed off 0) with tokenizer.model."""
    import sentencepiece
    import transformers

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    settings = dict(TINY, vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(),
                    eos_token_id=sp.eos_id(), pad_token_id=0)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings))
    perturb_biases_and_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    shutil.copy(sp_model, directory / "tokenizer.model")
    return directory


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def generation_check(load: str, out: str, tp: str) -> None:
    """run_many.py job: greedy continuations of :func:`prompts` by the checkpoint ``load`` at
    TP ``tp`` (rank 0 writes ``{"ours": ..., "margin": ...}`` to ``out``)."""
    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.inference.loading import load_for_inference

    loaded = load_for_inference(load, tp=int(tp))
    vocab = loaded.tokenizer.vocab_size
    results = generate(loaded.model, prompts(vocab), SamplingParams(max_new_tokens=NEW_TOKENS),
                       (), vocab, loaded.window, return_logits=True)
    margin = min((r.logits.topk(2, dim=-1).values.diff(dim=-1).abs()).min().item()
                 for r in results)
    if loaded.layout.rank == 0:
        Path(out).write_text(json.dumps({"ours": [r.token_ids for r in results],
                                         "margin": margin}))


@starts_early("gemma")
def start_gemma(request) -> dict:
    """The tiny model imported, then one launch per world size, started at the session's
    first test: its logits at every layout of :data:`LAYOUTS`, its greedy generations at
    TP=1 and TP=2, and the :data:`TRAINED` finetunings at TP=2 (both ranks share the one
    key/value head)."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("gemma3")
    data = request.getfixturevalue("imported_train_data")
    source = make_gemma3(root / "hf", request.getfixturevalue("sp_model"))
    import_hf(ImportConfig(str(source), str(root / "ckpt"), progress=False))
    torch.manual_seed(1)
    tokens = torch.randint(0, 1500, (2, 40))  # 40 > 4 windows
    jobs = {(tp, pp): logits_job(f"gemma3_{tp}_{pp}", root / "ckpt", tokens, root / "logits",
                                 tp, pp) for tp, pp in LAYOUTS}
    generation = {tp: call_job(f"generate_{tp}", "tests.models.families.test_gemma3:generation_check",
                               str(root / "ckpt"), str(root / f"generated_{tp}.json"), str(tp))
                  for tp in (1, 2)}
    train = {name: {"name": name, "argv": [
        "--data_path", data["prefix"], "--split", "90,10,0",
        "--vocab_extra_ids_list", ",".join(CHATML), "--seq_length", "96",
        "--variable_seq_lengths", "--micro_batch_size", "2", "--global_batch_size", "8",
        "--train_iters", "3", "--lr", "1e-2", "--eval_iters", "1", "--seed", "1234",
        "--load", str(source), "--save", str(root / name / "run"),
        "--tensor_model_parallel_size", "2", *flags]} for name, flags in TRAINED.items()}
    launches = [start_runs(4, [jobs[(4, 1)]], root / "tp4", early=True),
                start_runs(2, [jobs[(2, 1)], jobs[(1, 2)], generation[2], *train.values()],
                           root / "two", early=True),
                start_runs(1, [jobs[(1, 1)], generation[1]], root / "one", early=True)]
    return {"root": root, "source": source, "tokens": tokens, "jobs": jobs,
            "launches": launches}


@pytest.fixture(scope="module")
def gemma(request) -> dict:
    begun = started("gemma", request)
    results = {}
    for launch in begun["launches"]:
        results.update(launch.wait())
    root = begun["root"]
    return {"root": root, "source": begun["source"], "tokens": begun["tokens"],
            **{layout: job_logits(results, job) for layout, job in begun["jobs"].items()},
            "generated": {tp: json.loads((root / f"generated_{tp}.json").read_text())
                          for tp in (1, 2) if results[f"generate_{tp}"].returncode == 0},
            "results": results}


@pytest.mark.slow
def test_imported_logits_equal_transformers_at_tp1_tp2_tp4_pp2(gemma):
    want = hf_logits(gemma["source"], gemma["tokens"])
    for layout in LAYOUTS:
        got = gemma[layout][..., :want.shape[-1]]
        assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item()), layout


def test_what_makes_gemma_gemma_changes_the_logits(gemma, tmp_path, sp_model):
    """Each feature checked above matters for this input: without the window, with one RoPE
    base, without the embedding scale... transformers computes other logits."""
    import transformers

    tokens = gemma["tokens"]
    want = hf_logits(gemma["source"], tokens)
    config = json.loads((gemma["source"] / "config.json").read_text())
    variants = {"no window": dict(sliding_window=64),
                "one rope base": dict(rope_parameters={
                    "full_attention": config["rope_parameters"]["full_attention"],
                    "sliding_attention": dict(config["rope_parameters"]["full_attention"])}),
                "other scalar": dict(query_pre_attn_scalar=32)}
    model = transformers.Gemma3ForCausalLM.from_pretrained(gemma["source"],
                                                           dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    for name, change in variants.items():
        other = transformers.Gemma3TextConfig(**{**config, **change})
        other._attn_implementation = "eager"
        changed = transformers.Gemma3ForCausalLM(other).eval()
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (changed(tokens).logits - want).abs().max() > 1e-2, name


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_generation_equals_transformers(gemma, tp):
    import transformers

    assert f"generate_{tp}" in gemma["results"]
    result = gemma["results"][f"generate_{tp}"]
    assert result.returncode == 0, result.log[-3000:]
    ours = gemma["generated"][tp]
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma["source"],
                                                              dtype=torch.float32).eval()
    theirs = []
    for prompt in prompts(model.config.vocab_size):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             eos_token_id=None, pad_token_id=0)
        theirs.append(out[0, len(prompt):].tolist())
    assert ours["ours"] == theirs
    assert ours["margin"] > 1e-4  # no near-tie decided by rounding
    assert all(len(set(tokens)) >= 10 for tokens in theirs)  # non-trivial continuations


@pytest.fixture(scope="module")
def gemma_trained(gemma) -> dict:
    """The :data:`TRAINED` runs exported (the LoRA --adapter_only) and our logits at TP=1."""
    root = gemma["root"]
    for name in TRAINED:
        assert gemma["results"][name].returncode == 0, gemma["results"][name].log[-3000:]
    tokens = torch.randint(3, 1500, (2, 24), generator=torch.Generator().manual_seed(7))
    logits = {name: logits_job(name, root / name / "run", tokens, root / "logits")
              for name in TRAINED}
    exports = [tool_job("export-lora", "megatron_to_hf.py", "--load", str(root / "lora" / "run"),
                        "--out", str(root / "lora" / "adapter"), "--adapter_only"),
               tool_job("export-full", "megatron_to_hf.py", "--load", str(root / "full" / "run"),
                        "--out", str(root / "full" / "hf"), "--dtype", "fp32")]
    results = start_runs(1, exports + list(logits.values()), root / "exports").wait()
    for job in exports:
        assert results[job["name"]].returncode == 0, results[job["name"]].log[-3000:]
    return {"adapter": root / "lora" / "adapter", "hf": root / "full" / "hf", "tokens": tokens,
            **{name: job_logits(results, job) for name, job in logits.items()}}


@pytest.mark.slow
def test_lora_trained_at_tp2_exports_to_peft_with_our_logits(gemma, gemma_trained):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(gemma["source"],
                                                             dtype=torch.float32)
    base.config._attn_implementation = "eager"
    with torch.no_grad():
        plain = base.eval()(gemma_trained["tokens"]).logits
    model = peft.PeftModel.from_pretrained(base, gemma_trained["adapter"]).eval()
    with torch.no_grad():
        theirs = model(gemma_trained["tokens"]).logits
    ours = gemma_trained["lora"][..., :theirs.shape[-1]]
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4
    assert float((plain - theirs).abs().max() / theirs.abs().max()) > 1e-3  # it trained


@pytest.mark.slow
def test_finetuned_at_tp2_with_sp_exports_to_a_model_transformers_reproduces(gemma,
                                                                            gemma_trained):
    tokens = gemma_trained["tokens"]
    theirs = hf_logits(gemma_trained["hf"], tokens)
    assert theirs.shape[-1] == 1502  # the two chat tokens kept, the padding dropped
    ours = gemma_trained["full"][..., :theirs.shape[-1]]
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, theirs.abs().max().item())
    before = hf_logits(gemma["source"], tokens)
    assert (before - theirs[..., :before.shape[-1]]).abs().max() > 1e-3  # it trained


def test_hf_megatron_hf_gives_back_identical_tensors_and_config(tmp_path, sp_model):
    source = make_gemma3(tmp_path / "hf", sp_model)
    import_hf(ImportConfig(str(source), str(tmp_path / "ckpt"), progress=False))
    export_hf(ExportConfig(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False))
    assert_exported_as_source(source, tmp_path / "back", (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar",
        "hidden_activation", "vocab_size", "tie_word_embeddings", "max_position_embeddings"))


def write_gemma3_gguf(path: Path, source: Path, tokenizer_file: str) -> Path:
    """``source`` (an HF Gemma 3 directory) as llama.cpp's converter writes it: float32
    tensors under GGUF names, norm weights stored as ``1 + w``, no output layer (tied), the
    window, RoPE base and linear scaling in the metadata (the pattern, local base and
    attention scalar are llama.cpp's fixed ones, so ``source`` must use those)."""
    import gguf
    from safetensors.torch import load_file

    from tests.checkpointing.gguf_files import add_tokenizer, tokenizer_metadata, write_tensors

    config = json.loads((source / "config.json").read_text())
    full = config["rope_parameters"]["full_attention"]
    vocab = tokenizer_metadata(Path(tokenizer_file))
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("Tiny Gemma 3")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(full["rope_theta"])
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    writer.add_sliding_window(config["sliding_window"])
    add_tokenizer(writer, vocab)
    tensors = {name: tensor for name, tensor in
               load_file(str(source / "model.safetensors")).items() if name != "lm_head.weight"}
    write_tensors(writer, tensors, gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"],
                  lambda name, values: values + 1.0 if name.endswith("norm.weight") else values)
    return path


def test_gguf_import_reproduces_the_model(tmp_path, sp_model):
    """A Gemma 3 GGUF (six layers: five windowed, one global, as llama.cpp fixes it) imports
    to the model transformers computes from the original directory."""
    from megatron_ext.checkpointing.unsharded import UnshardedReader

    source = make_gemma3(tmp_path / "hf", sp_model, num_hidden_layers=6,
                         sliding_window_pattern=6, query_pre_attn_scalar=32)
    gguf_file = write_gemma3_gguf(tmp_path / "tiny.gguf", source, sp_model)
    import_hf(ImportConfig(str(gguf_file), str(tmp_path / "ckpt"), progress=False))
    model = UnshardedReader(str(tmp_path / "ckpt")).run_config()["model"]
    assert (model["sliding_window_pattern"], model["sliding_window_size"],
            model["rope_local_theta"], model["rope_scaling_type"]) == (6, 8, 10000.0, "linear")
    tokens = torch.randint(0, 1500, (1, 30))
    job = logits_job("gguf", tmp_path / "ckpt", tokens, tmp_path / "logits")
    got = job_logits(start_runs(1, [job], tmp_path / "launch").wait(), job)
    want = hf_logits(source, tokens)
    assert (got[..., :want.shape[-1]] - want).abs().max() < 1e-5 * max(1.0, want.abs().max())


@pytest.mark.parametrize("change, message", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention",
                      "sliding_attention"]}, "only every N-th layer attending globally"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0,
                                             "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "only linear is built"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
])
def test_configs_that_cannot_be_built_exactly_are_refused(tmp_path, sp_model, change, message):
    source = make_gemma3(tmp_path / "hf", sp_model)
    config = json.loads((source / "config.json").read_text())
    config.update(change)
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as raised:
        import_hf(ImportConfig(str(source), str(tmp_path / "ckpt"), progress=False))
    assert message in str(raised.value)
    assert not (tmp_path / "ckpt").exists()
