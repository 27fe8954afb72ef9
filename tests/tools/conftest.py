"""Tiny random Hugging Face Llama/Mistral/Qwen model directories with a real tokenizer file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.models.check_hf_logits import perturb_biases_and_norms

SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
             tie_word_embeddings=False)


# Qwen-style settings of the tiny models: Qwen2 ties its embeddings (as its small models do),
# Qwen3 has a head size of 32 with hidden 64 and 4 heads
QWEN = {"qwen2": dict(rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
        "qwen3": dict(rms_norm_eps=1e-6, rope_theta=1e6, head_dim=32)}


def make_hf_model(directory: Path, sp_model: str, family: str = "llama",
                  safetensors: bool = True, **overrides) -> Path:
    """Save a random ``LlamaForCausalLM``/``MistralForCausalLM``/``Qwen2ForCausalLM``/
    ``Qwen3ForCausalLM`` plus tokenizer.model (Qwen biases and norms perturbed)."""
    import sentencepiece
    import transformers

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    settings = dict(SHAPE, vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(),
                    eos_token_id=sp.eos_id())
    settings.update(overrides)
    torch.manual_seed(0)
    if family == "mistral":
        settings.setdefault("sliding_window", 8)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**settings))
    elif family in QWEN:
        settings = {**settings, **QWEN[family], **overrides}
        kind = family.capitalize()
        model = getattr(transformers, f"{kind}ForCausalLM")(
            getattr(transformers, f"{kind}Config")(**settings))
        perturb_biases_and_norms(model)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if not safetensors:  # older checkpoints: pickled .bin shards (transformers 5 writes none)
        for path in directory.glob("model*.safetensors*"):
            path.unlink()
        torch.save({k: v.clone() for k, v in model.state_dict().items()},
                   directory / "pytorch_model.bin")
    shutil.copy(sp_model, directory / "tokenizer.model")
    return directory


def with_hf_tokenizer(model: Path, tokenizer_dir: str, out: Path) -> Path:
    """A copy of the model directory ``model`` whose tokenizer is ``tokenizer_dir``'s
    tokenizer.json (and tokenizer_config.json) instead of tokenizer.model, with its BOS and
    EOS ids in config.json (the vocabulary sizes of the tests' tokenizers agree)."""
    from megatron_ext.tokenizers import HUGGINGFACE, TokenizerConfig, build_tokenizer

    shutil.copytree(model, out)
    (out / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    tokenizer = build_tokenizer(TokenizerConfig(HUGGINGFACE, str(out)))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model.eval()(tokens).logits


def assert_exported_as_source(source: Path, back: Path, config_keys) -> None:
    """HF -> ours -> HF: ``back`` (an export) holds exactly ``source``'s tensors, the same
    ``config_keys`` values, and transformers computes the same logits from it."""
    from safetensors.torch import load_file

    before = load_file(str(source / "model.safetensors"))
    after = {}
    for shard in back.glob("model*.safetensors"):
        after.update(load_file(str(shard)))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    want = json.loads((source / "config.json").read_text())
    got = json.loads((back / "config.json").read_text())
    for key in config_keys:
        assert got.get(key) == want.get(key), key
    tokens = torch.randint(0, want["vocab_size"], (1, 30))
    assert torch.equal(hf_logits(source, tokens), hf_logits(back, tokens))


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory, sp_model) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf_llama") / "model", sp_model)


@pytest.fixture(scope="session")
def hf_llama_bpe(tmp_path_factory, hf_llama, hf_tokenizer_dir) -> Path:
    """``hf_llama`` with a byte-level BPE tokenizer.json (Llama 3 style) and no
    tokenizer.model."""
    return with_hf_tokenizer(hf_llama, hf_tokenizer_dir,
                             tmp_path_factory.mktemp("hf_llama_bpe") / "model")


@pytest.fixture(scope="session")
def converted_llama(tmp_path_factory, hf_llama) -> Path:
    """``hf_llama`` converted once per session with the ChatML tokens added (read only:
    tests train from it with --save elsewhere, or copy it)."""
    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
    from tests.runs import CHATML

    out = tmp_path_factory.mktemp("converted_llama") / "ckpt"
    import_hf(ImportConfig(str(hf_llama), str(out), vocab_extra_ids_list=",".join(CHATML),
                           progress=False))
    return out


@pytest.fixture(scope="session")
def hf_mistral(tmp_path_factory, sp_model) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf_mistral") / "model", sp_model, "mistral")


@pytest.fixture(scope="session")
def hf_variants(tmp_path_factory, sp_model) -> dict[str, Path]:
    """Tied Llama (Llama 3.2 / SmolLM2 style), Qwen2 (tied, QKV biases), Qwen3 (q/k norms,
    head_dim 32)."""
    root = tmp_path_factory.mktemp("hf_variants")
    return {"llama-tied": make_hf_model(root / "llama-tied", sp_model,
                                        tie_word_embeddings=True),
            "qwen2": make_hf_model(root / "qwen2", sp_model, "qwen2"),
            "qwen3": make_hf_model(root / "qwen3", sp_model, "qwen3")}
