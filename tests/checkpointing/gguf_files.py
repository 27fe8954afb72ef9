"""Tiny GGUF files written from random ``transformers`` models, as llama.cpp's converter
lays them out (names, Llama q/k row order, tied output layer left out, quantized blocks,
tokenizer in the metadata), and transformers' own reading of them as the reference.

K-quants (Q2_K..Q6_K) cannot be produced by the ``gguf`` package's quantizer, so their
blocks are random bytes with small finite scales: what they decode to is whatever the
format says, which is all an importer has to reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# 256 wide: every row is a whole number of K-quant blocks (256 values)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
CHAT_TEMPLATE = ("{% for message in messages %}<|begin_of_text|>{{ message['role'] }}: "
                 "{{ message['content'] }}<|end_of_text|>{% endfor %}")
# byte offsets of the float16 scales inside one block of each K-quant
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                  "Q6_K": (208,)}

# name -> (transformers class, config, GGUF name, stored type per tensor kind)
VARIANTS = {
    "llama": ("Llama", {}, "Tiny Llama", {
        "q_proj": "F32", "k_proj": "F16", "v_proj": "Q8_0", "o_proj": "Q4_0",
        "gate_proj": "Q4_K", "up_proj": "Q5_K", "down_proj": "Q6_K", "embed_tokens": "Q8_0",
        "lm_head": "Q6_K"}),
    # SmolLM2 / Llama 3.2: no output.weight
    "llama-tied": ("Llama", dict(tie_word_embeddings=True, rope_theta=100000.0), "Tiny SmolLM", {
        "q_proj": "Q4_1", "k_proj": "Q8_0", "v_proj": "BF16", "o_proj": "Q5_0",
        "gate_proj": "Q5_1", "up_proj": "Q2_K", "down_proj": "Q3_K", "embed_tokens": "Q8_0"}),
    # a Mistral model as llama.cpp stores it: architecture llama, no window
    "mistral": ("Mistral", dict(sliding_window=None, rope_theta=1e6), "Mistral 7B Instruct v0.3", {
        "q_proj": "Q4_K", "k_proj": "Q4_0", "v_proj": "Q6_K", "o_proj": "Q8_0",
        "gate_proj": "Q4_1", "up_proj": "F16", "down_proj": "Q5_K", "embed_tokens": "F16",
        "lm_head": "Q8_0"}),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6),
              "Tiny Qwen2", {"q_proj": "Q8_0", "k_proj": "Q5_K", "v_proj": "Q4_K",
                             "o_proj": "Q6_K", "gate_proj": "Q4_0", "up_proj": "Q8_0",
                             "down_proj": "BF16", "embed_tokens": "Q6_K"}),
    # head size 128 with hidden 256 and 4 heads (transformers' default head_dim for Qwen3)
    "qwen3": ("Qwen3", dict(head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6), "Tiny Qwen3", {
        "q_proj": "Q6_K", "k_proj": "Q8_0", "v_proj": "Q4_1", "o_proj": "Q4_K",
        "gate_proj": "Q5_K", "up_proj": "Q4_0", "down_proj": "Q8_0", "embed_tokens": "Q4_K",
        "lm_head": "F16"}),
}
ARCHITECTURE = {"Llama": "llama", "Mistral": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3"}


def hf_model(variant: str, vocab: int, bos: int, eos: int, **extra):
    """A random transformers model of ``variant`` (biases and norms perturbed, since
    transformers starts them at 0 and 1, where a wrong mapping goes unseen)."""
    import transformers

    from tests.models.check_hf_logits import perturb_biases_and_norms

    kind, config, _, _ = VARIANTS[variant]
    settings = {**SHAPE, "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos,
                **config, **extra}
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(
        getattr(transformers, f"{kind}Config")(**settings))
    perturb_biases_and_norms(model)
    return model.eval()


def permute_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a Llama query/key matrix: per head, the two rotate-half
    halves interleaved."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def stored(values: np.ndarray, kind: str, rng: np.random.Generator):
    """``(array, raw_dtype)`` for GGUFWriter.add_tensor: ``values`` stored as ``kind``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        return values.astype(np.float32), None
    if kind == "F16":
        return values.astype(np.float16), None
    if kind in K_QUANT_SCALES:
        elements, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        blocks = rng.integers(0, 256, size=(rows, cols // elements, size), dtype=np.uint8)
        for offset in K_QUANT_SCALES[kind]:
            scale = rng.uniform(1e-4, 1e-3, size=(rows, cols // elements)).astype(np.float16)
            blocks[..., offset:offset + 2] = scale.view(np.uint8).reshape(rows, -1, 2)
        return blocks.reshape(rows, -1), qtype
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def tokenizer_metadata(tokenizer_file: Path) -> dict:
    """What llama.cpp stores of a tokenizer: a byte-level BPE tokenizer.json ("gpt2":
    tokens by id, merges, token types) or a SentencePiece model ("llama": pieces, scores,
    token types), with its BOS/EOS ids."""
    if tokenizer_file.suffix == ".model":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
        ids = range(sp.get_piece_size())
        kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)]
        return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in ids],
                "scores": [sp.get_score(i) for i in ids],
                "types": [next((kind for test, kind in kinds if test(i)), 1) for i in ids],
                "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = dict(spec["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    vocab.update(specials)
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    return {"model": "gpt2", "tokens": tokens,
            "merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
            "types": [3 if token in specials else 1 for token in tokens],  # CONTROL / NORMAL
            "bos": specials["<|begin_of_text|>"], "eos": specials["<|end_of_text|>"]}


def add_shape(writer, arch: str, config) -> None:
    """The model's sizes, head layout, norm epsilon and RoPE base as llama.cpp's keys."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tokenizer(writer, vocab: dict) -> None:
    """``vocab`` (:func:`tokenizer_metadata`) into a ``gguf.GGUFWriter``'s metadata."""
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
        writer.add_unk_token_id(vocab["unk"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])


def write_tensors(writer, tensors, architecture, layers: int, convert=None) -> None:
    """HF-named float ``tensors`` (name -> tensor) under their GGUF names (``convert(name,
    tensor)`` -> values first, where given), then the whole file written and closed."""
    import gguf

    table = gguf.get_tensor_name_map(architecture, layers)
    for name, tensor in tensors.items():
        values = tensor.float()
        if convert is not None:
            values = convert(name, values)
        stem, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{table.get_name(stem)}.{suffix}", values.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path: Path, variant: str, tokenizer_file: Path, types=None,
               extra_tensors=None, **extra) -> tuple[Path, object]:
    """Write ``variant`` (random weights, ``extra`` config settings) as a GGUF, each kind
    of matrix stored as ``types`` says (else as the variant says), ``extra_tensors``
    (GGUF name -> float32 values) added; returns (path, the HF model)."""
    import gguf

    kind, _, name, default_types = VARIANTS[variant]
    types = {**default_types, **(types or {})}
    vocab = tokenizer_metadata(tokenizer_file)
    model = hf_model(variant, len(vocab["tokens"]), vocab["bos"], vocab["eos"], **extra)
    config = model.config
    arch = ARCHITECTURE[kind]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    add_shape(writer, arch, config)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, vocab)
    writer.add_chat_template(CHAT_TEMPLATE)
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    rng = np.random.default_rng(0)
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        values = tensor.float().numpy()
        part = stem.rsplit(".", 1)[-1]
        if arch == "llama" and part in ("q_proj", "k_proj"):
            values = permute_heads(values, config.num_attention_heads if part == "q_proj"
                                   else config.num_key_value_heads)
        kind_of = "F32" if values.ndim == 1 else types[part]
        array, raw_dtype = stored(values, kind_of, rng)
        writer.add_tensor(f"{table.get_name(stem)}.{suffix}", array, raw_dtype=raw_dtype)
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, np.asarray(values, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def transformers_reference(path: Path):
    """What ``transformers`` builds from the file: ``from_pretrained(gguf_file=...)`` when
    accelerate (which it requires for GGUF) is installed; else the same steps by hand for
    these architectures: the config from the GGUF metadata, the tensors through its GGUF
    loader (``load_gguf_checkpoint``), tied weights tied."""
    import importlib.util

    import transformers

    from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once

    directory, name = str(path.parent), path.name
    if importlib.util.find_spec("accelerate") is not None:
        with transformers_reads_gguf_once():  # the same values, the file parsed once
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=name, dtype=torch.float32)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                       model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    model.config._attn_implementation = "eager"
    return model.eval()
