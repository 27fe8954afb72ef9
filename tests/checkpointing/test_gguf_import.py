"""GGUF import: the dequantized tensors and the config equal what ``transformers`` builds
from the file, the checkpoint reproduces its logits, the tokenizer comes from the
metadata, and a bad file is refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.checkpointing.unsharded import UnshardedReader
from megatron_ext.errors import UserError
from megatron_ext.models.gguf_checkpoint import GGUFModel, llama3_rope_factors
from megatron_ext.models.hf_config import model_args_from_hf_config
from megatron_ext.models.hf_llama import llama_to_megatron
from tests.checkpointing.gguf_files import (
    CHAT_TEMPLATE,
    VARIANTS,
    hf_model,
    permute_heads,
    transformers_reference,
    write_gguf,
)
from tests.conftest import REPO
from tests.runs import import_memory_growth, job_logits, logits_job, run_many

SMOLLM2 = sorted((REPO / ".assets" / "smollm2").glob("**/*.gguf"))
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type")


@pytest.fixture(scope="module")
def tokenizer_json(hf_tokenizer_dir) -> Path:
    return Path(hf_tokenizer_dir) / "tokenizer.json"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tokenizer_json, sp_model) -> dict[str, tuple[Path, object]]:
    """Every variant as a GGUF file: {name: (path, the HF model it was written from)};
    Mistral's with a SentencePiece vocabulary (as Mistral and Llama 2 files have), the
    others with a byte-level BPE one."""
    root = tmp_path_factory.mktemp("gguf")
    return {name: write_gguf(root / f"{name}.gguf", name,
                             Path(sp_model) if name == "mistral" else tokenizer_json)
            for name in VARIANTS}


@pytest.fixture(scope="module")
def references(gguf_files) -> dict:
    """transformers' model of each file."""
    return {name: transformers_reference(path) for name, (path, _) in gguf_files.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensors_and_config_equal_what_transformers_builds(gguf_files, references, variant):
    """Every tensor, dequantized and (Llama) un-permuted, bit for bit; the tied output
    layer absent on both sides; the config's shape fields the same."""
    path, _ = gguf_files[variant]
    ours = GGUFModel(str(path))
    reference = references[variant]
    state = reference.state_dict()
    names = ours.weights.names()
    tied = ours.config["tie_word_embeddings"]
    assert set(state) - set(names) == ({"lm_head.weight"} if tied else set())
    assert set(names) <= set(state)
    for name in names:
        assert ours.weights.shape(name) == tuple(state[name].shape), name
        assert torch.equal(ours.weights.get(name), state[name]), name
    theirs = reference.config
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    for key in CONFIG_KEYS:
        assert ours.config[key] == (head_dim if key == "head_dim" else getattr(theirs, key)), key
    assert np.float32(ours.config["rms_norm_eps"]) == np.float32(theirs.rms_norm_eps)
    assert ours.config["rope_theta"] == theirs.rope_parameters["rope_theta"]
    kind = ours.config["architectures"][0]
    assert kind == type(reference).__name__


def test_float_tensors_come_back_as_the_original_weights(gguf_files):
    """Independently of transformers: an F32 query matrix (stored in llama.cpp's row
    order) is the original exactly, an F16 key matrix its half-precision rounding, a Q8_0
    value matrix the original within the quantization step."""
    path, model = gguf_files["llama"]
    weights = GGUFModel(str(path)).weights
    state = model.state_dict()
    prefix = "model.layers.1.self_attn."
    assert torch.equal(weights.get(prefix + "q_proj.weight"), state[prefix + "q_proj.weight"])
    assert torch.equal(weights.get(prefix + "k_proj.weight"),
                       state[prefix + "k_proj.weight"].half().float())
    value = state[prefix + "v_proj.weight"]
    assert (weights.get(prefix + "v_proj.weight") - value).abs().max() < value.abs().max() / 100
    assert not torch.equal(torch.from_numpy(permute_heads(value.numpy(), 2)), value)


def test_import_writes_the_converted_checkpoint_and_the_tokenizer(tmp_path, gguf_files,
                                                                   references, tokenizer_json):
    path, _ = gguf_files["llama-tied"]
    out = tmp_path / "ckpt"
    summary = import_hf(ImportConfig(str(path), str(out), progress=False))
    assert (summary.weights_format, summary.family, summary.dtype) == ("gguf", "llama2",
                                                                       "float32")
    reader = UnshardedReader(str(out))
    want = llama_to_megatron(references["llama-tied"].state_dict(), 2, 4, 2, 1500, 1500,
                             tie_embeddings=True)
    assert sorted(reader.names()) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(reader.view(name), tensor), name
    run_config = reader.run_config()
    assert run_config["source"] == {
        "gguf_path": str(path), "model_type": "llama", "stored_dtype": "float32",
        "name": "Tiny SmolLM",
        "quantization": {"Q8_0": 3, "F32": 5, "Q4_1": 2, "BF16": 2, "Q5_0": 2, "Q5_1": 2,
                         "Q2_K": 2, "Q3_K": 2}}
    assert run_config["model"]["rope_theta"] == 100000.0
    assert run_config["model"]["layernorm_epsilon"] == 1e-5
    # the tokenizer, rebuilt from the metadata, is the one the file was written from
    folder = out / "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert (settings["bos_token"], settings["eos_token"]) == ("<|begin_of_text|>",
                                                              "<|end_of_text|>")
    from tokenizers import Tokenizer

    original, rebuilt = (Tokenizer.from_file(str(p)) for p in (tokenizer_json,
                                                              folder / "tokenizer.json"))
    for text in ("Grüße aus Köln! 日本語 🤖 x² ≤ ∞", "  two  spaces\nand\tTabs, 3.14"):
        assert rebuilt.encode(text).ids == original.encode(text).ids
    identity = run_config["tokenizer_identity"]
    assert (identity["bos_token"], identity["eos_token"]) == ("<|begin_of_text|>",
                                                              "<|end_of_text|>")


def test_sentencepiece_vocabulary_becomes_a_tokenizer_json(tmp_path, gguf_files, sp_model):
    """tokenizer.ggml.model "llama" (pieces and scores): the rebuilt tokenizer.json gives
    the SentencePiece model's ids and BOS/EOS. (Text that starts with several spaces is
    left out: transformers' conversion spells those with one dummy-prefix piece fewer.)"""
    import sentencepiece

    from megatron_ext.tokenizers import HUGGINGFACE, TokenizerConfig, build_tokenizer

    path, _ = gguf_files["mistral"]
    summary = import_hf(ImportConfig(str(path), str(tmp_path / "ckpt"), progress=False))
    assert summary.tokenizer_files[:2] == ["tokenizer.json", "tokenizer_config.json"]
    ours = build_tokenizer(TokenizerConfig(HUGGINGFACE, str(tmp_path / "ckpt" / "tokenizer")))
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert (ours.base_vocab_size, ours.bos_id, ours.eos_id) == (sp.get_piece_size(),
                                                                 sp.bos_id(), sp.eos_id())
    for text in ("Grüße aus Köln! 日本語 🤖 x² ≤ ∞", "two  spaces\nand\tTabs, 3.14"):
        assert ours.encode(text) == sp.encode(text), text


def test_dtype_flag_and_extra_tokens(tmp_path, gguf_files, references):
    path, _ = gguf_files["qwen2"]
    summary = import_hf(ImportConfig(str(path), str(tmp_path / "ckpt"), dtype="bf16",
                                     vocab_extra_ids_list="<|im_start|>,<|im_end|>",
                                     progress=False))
    assert (summary.dtype, summary.new_token_rows, summary.family) == ("bfloat16", 2, "qwen2")
    reader = UnshardedReader(summary.out)
    assert reader.run_config()["source"]["stored_dtype"] == "bfloat16"
    state = references["qwen2"].state_dict()
    qkv = reader.view("decoder.layers.0.self_attention.linear_qkv.bias")
    want = llama_to_megatron(state, 2, 4, 2, 1502, 1502, True, qkv_bias=True)
    assert torch.equal(qkv, want["decoder.layers.0.self_attention.linear_qkv.bias"].bfloat16())


def llama3_scaling(theta: float = 500000.0, factor: float = 8.0) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": theta}


def rope_freqs_of(config) -> np.ndarray:
    """llama.cpp's rope_freqs for a config: transformers' plain inverse frequencies over its
    scaled ones (computed by transformers, not by the code under test)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (plain / scaled).numpy()


@pytest.fixture(scope="module")
def scaled_gguf(tmp_path_factory, tokenizer_json) -> tuple[Path, object]:
    """A Llama 3.1/3.2-style file: RoPE scaling as a rope_freqs.weight tensor, with the HF
    model (and its scaling config) it stands for."""
    root = tmp_path_factory.mktemp("scaled")
    settings = dict(rope_theta=500000.0, rope_parameters=llama3_scaling(),
                    max_position_embeddings=8192)
    freqs = rope_freqs_of(hf_model("llama-tied", 1500, 0, 1, **settings).config)
    return write_gguf(root / "scaled.gguf", "llama-tied", tokenizer_json,
                      extra_tensors={"rope_freqs.weight": freqs}, **settings)


def test_llama3_rope_scaling_is_read_back_from_rope_freqs(scaled_gguf, tmp_path,
                                                          tokenizer_json):
    path, model = scaled_gguf
    config = GGUFModel(str(path)).config
    assert config["rope_scaling"] == {k: v for k, v in llama3_scaling().items()
                                      if k != "rope_theta"}
    args = model_args_from_hf_config(config)
    assert (args["model_name"], args["rope_scaling_factor"], args["rope_theta"]) == (
        "llama3", 8.0, 500000.0)
    # factors of another shape cannot be built: refused, not approximated
    bad = rope_freqs_of(model.config)
    bad[5] *= 1.5
    other, _ = write_gguf(tmp_path / "bad.gguf", "llama-tied", tokenizer_json,
                          extra_tensors={"rope_freqs.weight": bad})
    with pytest.raises(UserError, match="rope_freqs.weight holds RoPE frequency factors"):
        GGUFModel(str(other))
    assert llama3_rope_factors(8.0, 500000.0, 64)[0] == 1.0


@pytest.fixture(scope="module")
def imported_logits(tmp_path_factory, gguf_files, scaled_gguf) -> dict:
    """Our checkpoints' logits (one serial launch) for the tied Llama, Mistral-as-Llama,
    Qwen2, Qwen3 and RoPE-scaled imports (Qwen3's through the tool's command line)."""
    from tests.tools.test_hf_conversion import tool_main

    root = tmp_path_factory.mktemp("gguf_logits")
    sources = {name: gguf_files[name][0] for name in ("llama-tied", "mistral", "qwen2", "qwen3")}
    sources["scaled"] = scaled_gguf[0]
    torch.manual_seed(1)
    tokens = torch.randint(0, 1000, (2, 40))  # within both vocabularies
    jobs = {}
    for name, path in sources.items():
        if name == "qwen3":
            tool_main("hf_to_megatron.py")(["--model_path", str(path), "--out", str(root / name),
                                            "--no_progress"])
        else:
            import_hf(ImportConfig(str(path), str(root / name), progress=False))
        jobs[name] = logits_job(name, root / name, tokens, root / "logits")
    results = run_many(1, list(jobs.values()), root / "launch")
    return {"tokens": tokens, **{name: job_logits(results, job) for name, job in jobs.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama-tied", "mistral", "qwen2", "qwen3"])
def test_imported_checkpoint_reproduces_transformers_logits(imported_logits, references,
                                                            variant):
    tokens = imported_logits["tokens"]
    with torch.no_grad():
        want = references[variant](tokens).logits
    got = imported_logits[variant][..., :want.shape[-1]]
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.slow
def test_rope_scaled_import_computes_the_scaled_model(imported_logits, scaled_gguf):
    """transformers' GGUF loader drops rope_freqs; the HF model the file stands for (its
    weights as transformers dequantizes them, its RoPE scaling) is the reference."""
    path, original = scaled_gguf
    reference = transformers_reference(path)
    model = type(original)(original.config).eval()
    model.config._attn_implementation = "eager"
    model.load_state_dict(reference.state_dict())
    tokens = imported_logits["tokens"]
    with torch.no_grad():
        want, unscaled = model(tokens).logits, reference(tokens).logits
    got = imported_logits["scaled"][..., :want.shape[-1]]
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max() < 1e-5 * scale
    assert (unscaled - want).abs().max() > 1e-4 * scale  # the scaling matters here


# ------------------------------------------------------------------ bad files
def refused(tmp_path: Path, model_path: Path, match: str) -> str:
    """Import ``model_path``, expect a UserError matching ``match``, check nothing is left."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as raised:
        import_hf(ImportConfig(str(model_path), str(out), progress=False))
    assert str(model_path) in str(raised.value)
    assert not out.exists() and not (tmp_path / "out.incomplete").exists()
    return str(raised.value)


def test_truncated_file_is_refused(tmp_path, gguf_files):
    data = gguf_files["llama"][0].read_bytes()
    for cut in (len(data) // 2, 100):  # in the tensor data, in the metadata
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        refused(tmp_path, path, "truncated or damaged")


def test_non_gguf_file_is_refused(tmp_path, tokenizer_json):
    refused(tmp_path, tokenizer_json, "is not a GGUF file")
    missing = tmp_path / "absent.gguf"
    refused(tmp_path, missing, "no such GGUF file")


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = refused(tmp_path, tmp_path / "m.gguf", "architecture 'gemma2' is not supported")
    assert "llama, qwen2, qwen3" in message


def test_unsupported_tensor_type_is_refused(tmp_path, tokenizer_json):
    import gguf

    path, _ = write_gguf(tmp_path / "m.gguf", "llama", tokenizer_json, types={"o_proj": "Q8_0"})
    # the same file with its Q8_0 tensors relabelled Q8_1 (no dequantizer in gguf)
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0 and "attn_output" in tensor.name:
            offset = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:4])
            data[offset:offset + 4] = int(gguf.GGMLQuantizationType.Q8_1).to_bytes(4, "little")
            break
    del reader
    relabelled = tmp_path / "q81.gguf"
    relabelled.write_bytes(bytes(data))
    message = refused(tmp_path, relabelled, "Q8_1")
    assert "Q4_0" in message


def test_tensors_outside_the_layout_are_refused(tmp_path, tokenizer_json):
    """A Llama file with query biases would lose them: refused."""
    path, _ = write_gguf(tmp_path / "m.gguf", "llama", tokenizer_json,
                         extra_tensors={"blk.0.attn_q.bias": np.zeros(256)})
    refused(tmp_path, path, "blk.0.attn_q.bias")


# ------------------------------------------------------------------ memory
@pytest.mark.slow
def test_import_streams_instead_of_dequantizing_the_model(tmp_path, tokenizer_json,
                                                          gguf_files):
    """Peak memory grows by a few layers, not by the dequantized model (16 layers, ~220 MB
    as float32, ~60 MB as Q8_0)."""
    types = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "embed_tokens", "lm_head"), "Q8_0")
    path, model = write_gguf(tmp_path / "big.gguf", "llama", tokenizer_json, types=types,
                             hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                             num_attention_heads=8, num_key_value_heads=8)
    size = 4 * sum(p.numel() for p in model.parameters())
    del model
    assert size > 200 * 2**20
    # anonymous memory only: the memory-mapped file's pages are page cache the kernel can
    # drop; a small file imported first takes what every import costs once
    growth = import_memory_growth(path, tmp_path / "o", "RssAnon", (gguf_files["llama"][0],))
    assert growth < 0.4 * size, (growth, size)


# ------------------------------------------------------------------ the real model
@pytest.mark.skipif(not SMOLLM2, reason="the SmolLM2 GGUF asset (.assets/smollm2) is absent")
def test_smollm2_q4_1_dequantizes_as_transformers_does():
    """SmolLM2-135M-Instruct Q4_1 (tied, Q8_0 embeddings): the config, and a sample of
    tensors through transformers' own per-tensor GGUF steps (dequantize, Llama q/k order)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    path = str(SMOLLM2[0])
    model = GGUFModel(path)
    config = model.config
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "vocab_size",
                                   "tie_word_embeddings", "rope_theta", "rms_norm_eps",
                                   "bos_token_id", "eos_token_id")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2}
    assert model.quantization() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    processor = TENSOR_PROCESSORS["llama"](config=config)
    tensors = {t.name: t for t in model.reader.tensors}
    sample = {"token_embd.weight": "model.embed_tokens.weight",
              "blk.7.attn_q.weight": "model.layers.7.self_attn.q_proj.weight",
              "blk.7.attn_k.weight": "model.layers.7.self_attn.k_proj.weight",
              "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
              "output_norm.weight": "model.norm.weight"}
    for gguf_name, hf_name in sample.items():
        tensor = tensors[gguf_name]
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
        want = torch.from_numpy(np.copy(processor.process(values, gguf_name).weights))
        assert torch.equal(model.weights.get(hf_name), want), hf_name


def test_the_shared_reader_gives_gguf_own_fields_and_tensors(gguf_files):
    """The reader that GGUFModel and transformers_reads_gguf_once share slices a plain view
    of the memory map (3x faster to open): every field's parts and every tensor equal what
    gguf's own reader gives, on a tiny file and on the real SmolLM2 (49k-token vocabulary
    and merges); a gguf whose ``_get`` differs keeps its own reader."""
    import gguf

    from megatron_ext.models.gguf_checkpoint import _quick_reader_class, _reader

    paths = [gguf_files["qwen2"][0], *SMOLLM2[:1]]
    for path in paths:
        want, got = gguf.GGUFReader(str(path)), _reader(str(path))
        assert type(got) is not gguf.GGUFReader and isinstance(got, gguf.GGUFReader)
        assert list(got.fields) == list(want.fields)
        for name, field in want.fields.items():
            other = got.fields[name]
            assert (other.types, other.data, other.offset) == (field.types, field.data,
                                                              field.offset), name
            assert len(other.parts) == len(field.parts)
            assert all(a.dtype == b.dtype and np.array_equal(a, b)
                       for a, b in zip(other.parts, field.parts)), name
        assert [(t.name, t.tensor_type, t.shape.tolist()) for t in got.tensors] == \
            [(t.name, t.tensor_type, t.shape.tolist()) for t in want.tensors]
        assert all(a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
                   for a, b in zip(got.tensors, want.tensors))
    assert len(paths) == 2  # the real file is installed by setup_env.sh: never skipped

    class OtherGet(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None, extra=None):
            return super()._get(offset, dtype, count, override_order)

    assert _quick_reader_class(OtherGet) is OtherGet


def test_transformers_reads_a_gguf_file_once_with_the_same_values(gguf_files):
    """transformers_reads_gguf_once: transformers' own GGUF loading parses the file once
    (config, weights and tokenizer) and gives what it gives without it; the ``gguf``
    module is itself again after the block."""
    import gguf
    import transformers

    from megatron_ext.models import gguf_checkpoint

    path, _ = gguf_files["qwen2"]
    opened = []
    original = gguf.GGUFReader

    class Counting(original):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    def load():
        return (transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32),
                transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))

    gguf.GGUFReader = Counting
    gguf_checkpoint._READERS.clear()
    try:
        with gguf_checkpoint.transformers_reads_gguf_once():
            model, tokenizer = load()
        assert gguf.GGUFReader is Counting and len(opened) == 1, opened
        plain_model, plain_tokenizer = load()
        assert len(opened) == 4  # transformers' own: config, weights, tokenizer
    finally:
        gguf.GGUFReader = original
        gguf_checkpoint._READERS.clear()
    want, got = plain_model.state_dict(), model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.config.to_dict() == plain_model.config.to_dict()
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()
    assert gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"
