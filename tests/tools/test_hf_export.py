"""tools/megatron_to_hf.py: HF -> Megatron -> HF is identical; a finetuned run exports exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_ext.checkpointing.hf_export import ExportConfig, export_dtype, export_hf
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.data.records import ASSISTANT, SYSTEM, USER, Message
from tests.conftest import CHATML
from tests.tools.conftest import assert_exported_as_source, hf_logits, make_hf_model
from tests.runs import job_logits, logits_job, model_args, run_many
from tests.tools.test_hf_conversion import run_tool

CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
               "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id",
               "tie_word_embeddings", "sliding_window", "head_dim", "layer_types",
               "use_sliding_window")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> str:
    """A tokenizer built like Qwen2's (NFC, Qwen's split pattern, byte level, <|endoftext|>):
    transformers loads the tokenizer of every qwen2 model as ``Qwen2Tokenizer``, which
    rebuilds that pipeline, so only such a tokenizer exports exactly with a qwen2 model."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tests.conftest import _corpus

    directory = tmp_path_factory.mktemp("qwen_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return str(directory)


def hf_model_with_hf_tokenizer(directory, hf_tokenizer_dir, sp_model, family,
                               bos="<|begin_of_text|>", eos="<|end_of_text|>", **overrides):
    """A model whose tokenizer.json needs no new tokens: the round trip must be identical."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = tok.get_vocab(with_added_tokens=True)
    model = make_hf_model(directory, sp_model, family, vocab_size=vocab,
                          bos_token_id=ids[bos] if bos else None, eos_token_id=ids[eos],
                          **overrides)
    (model / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{hf_tokenizer_dir}/{name}", model / name)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "llama-tied", "qwen2", "qwen3"])
def test_hf_megatron_hf_gives_back_identical_tensors_and_config(tmp_path, family,
                                                                 hf_tokenizer_dir, sp_model,
                                                                 qwen_tokenizer_dir):
    overrides = {"tie_word_embeddings": True} if family == "llama-tied" else {}
    if family == "qwen2":
        overrides.update(hf_tokenizer_dir=qwen_tokenizer_dir, bos=None, eos="<|endoftext|>")
    overrides.setdefault("hf_tokenizer_dir", hf_tokenizer_dir)
    source = hf_model_with_hf_tokenizer(tmp_path / "hf", sp_model=sp_model,
                                        family=family.removesuffix("-tied"), **overrides)
    import_hf(ImportConfig(str(source), str(tmp_path / "ckpt"), progress=False))
    # default flags: the export keeps the dtype the model came in with (fp32 here)
    summary = export_hf(ExportConfig(str(tmp_path / "ckpt"), str(tmp_path / "back"),
                                     progress=False))
    assert summary.vocab_size == json.loads((source / "config.json").read_text())["vocab_size"]
    assert_exported_as_source(source, tmp_path / "back", CONFIG_KEYS)


@pytest.mark.slow
def test_finetuned_checkpoint_exports_to_a_model_transformers_reproduces(
        tmp_path, hf_llama, converted_llama, imported_train_data):
    import transformers

    run, exported = tmp_path / "run", tmp_path / "hf"
    torch.manual_seed(2)
    tokens = torch.randint(0, 1502, (2, 32))
    logits = logits_job("ours", run, tokens, tmp_path / "launch")  # at TP=1, after training
    results = run_many(2, [{"name": "train", "argv": model_args(imported_train_data, 3) + [
        "--load", str(converted_llama), "--finetune", "--use_checkpoint_args", "--save", str(run),
        "--tensor_model_parallel_size", "2"]}, logits], tmp_path / "launch")
    assert results["train"].returncode == 0, results["train"].log[-3000:]
    ours = job_logits(results, logits)
    result = run_tool("megatron_to_hf.py", "--load", str(run), "--out", str(exported),
                      "--dtype", "fp32")
    assert "chat template: chatml" in result.stdout
    theirs = hf_logits(exported, tokens)
    assert theirs.shape[-1] == 1502  # padding removed, the two chat tokens kept
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, theirs.abs().max().item())
    # and it is a finetuned model, not the converted one
    assert (hf_logits(hf_llama, tokens.clamp(max=1499)) - theirs[..., :1500]).abs().max() > 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    from megatron_ext.data.chat_formats import build_chat_format
    from megatron_ext.checkpointing.hf_tokenizer import chat_template_ids, format_ids
    from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer

    ours_tok = build_tokenizer(TokenizerConfig(
        "SentencePieceTokenizer", imported_train_data["vocab_file"], CHATML,
        megatron_llm_specials=False))
    conversation = (Message(SYSTEM, "Be brief."), Message(USER, "What is 2+2?"),
                    Message(ASSISTANT, "4"))
    messages = [{"role": m.role, "content": m.content} for m in conversation]
    assert chat_template_ids(tokenizer, messages) == format_ids(
        build_chat_format("chatml", ours_tok), conversation)
    generation = json.loads((exported / "generation_config.json").read_text())
    assert ours_tok.token_id("<|im_end|>") in generation["eos_token_id"]


def test_export_dtype_defaults_to_the_models_own():
    """--dtype wins; else the trained precision; else the imported dtype; else fp32."""
    trained_bf16 = {"precision": {"bf16": True, "fp16": False},
                    "source": {"stored_dtype": "float32"}}
    assert export_dtype(None, trained_bf16) == "bf16"
    assert export_dtype("fp16", trained_bf16) == "fp16"
    assert export_dtype(None, {"precision": {"bf16": False, "fp16": False}}) == "fp32"
    assert export_dtype(None, {"source": {"stored_dtype": "bfloat16"}}) == "bf16"
    assert export_dtype(None, {"source": {"stored_dtype": "float16"}}) == "fp16"
    assert export_dtype(None, {}) == "fp32"  # e.g. a legacy checkpoint: lossless


def test_imported_model_records_its_dtype_for_the_export(tmp_path, hf_llama):
    import_hf(ImportConfig(str(hf_llama), str(tmp_path / "ckpt"), dtype="bf16", progress=False))
    run_config = json.loads((tmp_path / "ckpt" / "run_config.json").read_text())
    assert run_config["source"]["stored_dtype"] == "bfloat16"
    assert export_dtype(None, run_config) == "bf16"
