"""Any project checkpoint -> one GGUF file llama.cpp, Ollama and LM Studio run.

The inverse of the GGUF import (:mod:`megatron_ext.models.gguf_checkpoint`), built from
the same pieces: the family's GGUF layout (``Family.gguf``), the ``gguf`` package's
tensor name table (looked up the same way as on import), the row orders undone there
redone here (:func:`~megatron_ext.models.gguf_checkpoint.stored_tensor`), and the HF
export's tensors, tokenizer and chat template (:mod:`hf_export`, :mod:`hf_tokenizer`),
turned into llama.cpp's tokenizer metadata by the ``gguf`` package's own vocabulary
readers (``gguf.vocab``).

Why streamed: the header (metadata and every tensor's name, type and shape) is written
first, from the shapes of the non-layer tensors and of layer 0 (all layers have one
shape); the tensors then follow one at a time as the checkpoint yields them, converted
with ``gguf.quants`` (f16, bf16, q8_0), so memory holds about one layer.

Why atomic: the file is written under a temporary name beside ``--out`` and renamed
over it when complete (:class:`megatron_ext.io.AtomicFile`): llama.cpp never finds a
half-written model under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from megatron_ext.checkpointing.hf_export import usable_chat_format, weight_groups
from megatron_ext.checkpointing.hf_tokenizer import export_hf_tokenizer, generation_config_eos
from megatron_ext.checkpointing.options import GGUFExportConfig  # (lives there: no torch)
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.sources import open_checkpoint
from megatron_ext.errors import CheckpointError, ConfigError, TokenizerError
from megatron_ext.io import AtomicFile
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.gguf_checkpoint import (
    ROPE_FREQS,
    _gguf,
    export_layout,
    gguf_name_table,
    llama3_rope_factors,
    stored_tensor,
)
from megatron_ext.models.hf_config import export_adapter, hf_config_from_model_args
from megatron_ext.tokenizers import TOKENIZER_JSON, SentencePieceTokenizer, build_tokenizer

logger = logging.getLogger(__name__)

# --outtype (llama.cpp's names) -> gguf.GGMLQuantizationType name and llama.cpp's file type
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}

# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) by the regular expression a
# tokenizer.json splits text with before its byte-level BPE (llama.cpp applies the same)
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",  # digits one by one, then GPT-2's expression
    ("Split:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
     "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", "ByteLevel"): "llama-bpe",
    ("Split:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
     "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", "ByteLevel"): "qwen2",
}


@dataclass(frozen=True)
class GGUFExportSummary:
    """What :func:`export_gguf` wrote."""

    out: str
    source: str  # dist | unsharded | legacy | adapters
    iteration: int
    architecture: str
    outtype: str
    tensors: int
    layers: int
    vocab_size: int
    tokenizer_model: str  # gpt2 | llama
    pre_tokenizer: Optional[str]
    add_bos: bool
    chat_format: Optional[str]
    eos_ids: list[int]
    bytes: int
    seconds: float
    types: dict = field(default_factory=dict)  # tensor count per stored type

    def run_lines(self) -> list[str]:
        """How to run the file: llama.cpp's CLI and an Ollama Modelfile."""
        name = os.path.basename(self.out)
        return [f"llama-cli -m {self.out} -cnv",
                f"Ollama: a Modelfile with the line 'FROM ./{name}' beside the file, then "
                f"ollama create mymodel -f Modelfile && ollama run mymodel"]


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing ``--out`` unless ``overwrite`` (before any work) and a name
    without the .gguf suffix llama.cpp and Ollama look for."""
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give the .gguf file to write")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"--out {out} already exists; choose another name or pass --force "
                          "to replace it")
    if not out.lower().endswith(".gguf"):
        raise ConfigError(f"--out {out}: name the file *.gguf (llama.cpp and Ollama expect it)")


def export_gguf(config: GGUFExportConfig) -> GGUFExportSummary:
    """Write ``config.out``; returns a summary. Nothing is left under that name on failure."""
    from megatron_ext.cli import ProgressBar

    gguf = _gguf()
    start = time.perf_counter()
    if config.outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {config.outtype!r} is not supported; choose one of "
                          f"{', '.join(OUTTYPES)}")
    check_out(config.out, config.overwrite)
    source = open_checkpoint(config.load, config.iteration, config.base)
    model = source.run_config.get("model")
    if not model:
        raise CheckpointError(f"{source.path}: its run config has no model arguments")
    args = ModelArgs.from_dict(model).resolved()
    if args.num_experts:  # llama.cpp stacks a layer's experts (ffn_*_exps): not written yet
        raise UnsupportedModelError(
            f"{source.path} is a mixture of {args.num_experts} experts: GGUF export of one is "
            "not built; export it as a Hugging Face model (tools/megatron_to_hf.py) and "
            "convert that with llama.cpp's convert_hf_to_gguf.py")
    adapter = export_adapter(args.model_name)
    tokenizer_home = source.base.path if source.base is not None else config.load
    tokenizer = build_tokenizer(tokenizer_config_from_run(tokenizer_home, source.run_config,
                                                          config.vocab_file))
    chat_format, template = usable_chat_format(config.chat_format, config.prompt_template,
                                               source.run_config, tokenizer)
    eos_ids = generation_config_eos(tokenizer, chat_format, template)
    hf_config = hf_config_from_model_args(model, tokenizer.vocab_size, tokenizer.bos_id,
                                          eos_ids[0], tokenizer.pad_id, "float32")
    layout = export_layout(hf_config["model_type"])
    arch = layout.architecture
    heads = args.num_attention_heads
    kv = args.num_attention_heads_kv or heads
    qtype = gguf.GGMLQuantizationType[OUTTYPES[config.outtype][0]]

    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    with AtomicFile(config.out, "wb") as target:
        writer = gguf.GGUFWriter(target.tmp, arch)
        writer.add_name(os.path.splitext(os.path.basename(config.out))[0])
        writer.add_file_type(OUTTYPES[config.outtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in model_metadata(layout, args, hf_config).items():
            _add_value(writer, f"{arch}.{key}", value)
        vocab = add_tokenizer(writer, tokenizer, chat_format, template, eos_ids)

        groups, first = weight_groups(source, tokenizer, config.load)
        table = gguf_name_table(arch, args.num_layers)

        def converted(hf: dict[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray, Any]]:
            """(GGUF name, stored array, raw type or None) of HF tensors, in order."""
            for name, tensor in hf.items():
                stem, suffix = name.rsplit(".", 1)
                gguf_name = table.get_name(stem)
                if gguf_name is None:
                    raise UnsupportedModelError(f"{name} has no GGUF name in llama.cpp's "
                                                f"{arch} layout")
                values = stored_tensor(layout, name, tensor.float(), heads, kv).numpy()
                yield (f"{gguf_name}.{suffix}",) + _quantized(values, qtype, gguf)

        def layer(group: dict, index: int) -> dict[str, torch.Tensor]:
            try:
                return adapter.layer_from_megatron(group, index, heads, kv)
            except KeyError as exc:
                raise CheckpointError(f"{config.load}: layer {index} lacks {exc.args[0]} "
                                      "(an incomplete or foreign checkpoint)") from None

        extra = {}
        if args.rope_scaling_factor and args.rope_scaling_type == "llama3":
            extra[ROPE_FREQS] = np.asarray(llama3_rope_factors(
                args.rope_scaling_factor, args.rope_theta, args.kv_channels), np.float32)
        head = list(converted(adapter.embeddings_from_megatron(
            first, tokenizer.vocab_size, tied=args.tie_embeddings)))
        del first
        layer0 = list(converted(layer(next(groups), 0)))
        # every tensor's info before any data: layer 0's shapes stand for every layer's
        infos = [(name, array, raw) for name, array, raw in head]
        infos += [(name, array, None) for name, array in extra.items()]
        for index in range(args.num_layers):
            infos += [(re.sub(r"^blk\.0\.", f"blk.{index}.", name), array, raw)
                      for name, array, raw in layer0]
        for name, array, raw in infos:
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
        types: dict[str, int] = {}
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        def write(items) -> None:
            for name, array, raw in items:
                kind = (raw.name if raw is not None else
                        ("F16" if array.dtype == np.float16 else "F32"))
                types[kind] = types.get(kind, 0) + 1
                writer.write_tensor_data(array)

        write(head)
        write((name, array, None) for name, array in extra.items())
        del head
        write(layer0)
        del layer0
        layers = 1
        bar = ProgressBar(total=args.num_layers - 1, desc="exporting layers", unit="layer",
                          enabled=config.progress)
        for group in bar.wrap(groups):
            items = list(converted(layer(group, layers)))
            expected = infos[len(infos) - (args.num_layers - layers) * len(items):]
            for (name, array, _), (want, info, _) in zip(items, expected):
                if name != want or array.shape != info.shape:
                    raise CheckpointError(f"{config.load}: layer {layers} differs in shape "
                                          f"from layer 0 ({name} {array.shape})")
            write(items)
            layers += 1
        if layers != args.num_layers:
            raise CheckpointError(f"{config.load}: {layers} layers found, the run config says "
                                  f"{args.num_layers}")
        writer.close()
        size = os.path.getsize(target.tmp)
        target.commit()
    return GGUFExportSummary(
        out=config.out, source=source.kind, iteration=source.iteration, architecture=arch,
        outtype=config.outtype, tensors=len(infos), layers=layers,
        vocab_size=tokenizer.vocab_size, tokenizer_model=vocab["model"],
        pre_tokenizer=vocab["pre"], add_bos=vocab["add_bos"], chat_format=chat_format,
        eos_ids=eos_ids, bytes=size, seconds=time.perf_counter() - start, types=types)


def _quantized(values: np.ndarray, qtype, gguf) -> tuple[np.ndarray, Any]:
    """``(array, raw type)`` for ``GGUFWriter``: 1-D tensors (norms, biases) stay float32 as
    llama.cpp's converter keeps them; q8_0 rows that are no whole number of blocks fall
    back to f16, as there."""
    kind = qtype.name
    if values.ndim == 1 or kind == "F32":
        return values.astype(np.float32, copy=False), None
    if kind == "Q8_0" and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        kind, qtype = "F16", gguf.GGMLQuantizationType.F16
    if kind == "F16":
        return values.astype(np.float16), None
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def _add_value(writer, key: str, value: Any) -> None:
    gguf = _gguf()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY)


def model_metadata(layout, args: ModelArgs, hf_config: dict) -> dict[str, Any]:
    """``<architecture>.*`` metadata (keys without the prefix): the Llama-style keys the
    import reads (:meth:`GGUFModel.llama_style_config`), then the family's own
    (``GGUFLayout.metadata``)."""
    window = args.sliding_window_size
    context = int(args.max_position_embeddings or args.seq_length)
    if window and layout.metadata is None and window < context:
        raise UnsupportedModelError(
            f"llama.cpp's {layout.architecture} architecture has no sliding attention window; "
            f"this model's window ({window}) is shorter than its context ({context}), so "
            "llama.cpp would compute other logits")
    metadata: dict[str, Any] = {
        "context_length": context,
        "embedding_length": args.hidden_size,
        "feed_forward_length": int(args.ffn_hidden_size),
        "block_count": args.num_layers,
        "attention.head_count": args.num_attention_heads,
        "attention.head_count_kv": args.num_attention_heads_kv or args.num_attention_heads,
        "rope.freq_base": float(args.rope_theta),
        "attention.layer_norm_rms_epsilon": float(args.layernorm_epsilon),
        "vocab_size": int(hf_config["vocab_size"]),
    }
    head_dim = int(args.kv_channels)
    if layout.permuted_qk:
        metadata["rope.dimension_count"] = head_dim
    else:
        metadata["attention.key_length"] = head_dim
        metadata["attention.value_length"] = head_dim
    if args.rope_scaling_factor and args.rope_scaling_type != "llama3":  # llama3: rope_freqs
        metadata["rope.scaling.type"] = str(args.rope_scaling_type)
        metadata["rope.scaling.factor"] = float(args.rope_scaling_factor)
    if layout.metadata is not None:
        metadata.update(layout.metadata(args, hf_config))
    return {key: value for key, value in metadata.items() if value is not None}


# ---------------------------------------------------------------- tokenizer
def pre_tokenizer_name(tokenizer_json: dict) -> Optional[str]:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json: the name of
    the expression its pre-tokenizer splits text with; None for one llama.cpp does not
    know (the export then writes ``default`` and warns)."""
    spec = tokenizer_json.get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    key = []
    for part in parts:
        kind = part.get("type")
        if kind == "Split":
            key.append(f"Split:{(part.get('pattern') or {}).get('Regex')}")
        elif kind == "ByteLevel" and part.get("use_regex", True) is False:
            continue  # the bytes mapping only: the expression came from the Split
        elif kind == "Digits" and not part.get("individual_digits"):
            key.append("Digits:grouped")
        else:
            key.append(kind)
    return PRE_TOKENIZERS.get(tuple(key))


def add_tokenizer(writer, tokenizer, chat_format: Optional[str], template: Optional[str],
                  eos_ids: list[int]) -> dict:
    """The tokenizer in llama.cpp's form: ``gpt2`` (byte-level BPE with merges) or
    ``llama`` (SentencePiece scores and token types), every special id, ``add_bos_token``
    as the tokenizer itself does it, and the chat template. Read by the ``gguf`` package's
    own vocabulary classes from the HF tokenizer export (the same files, ids and template
    ``tools/megatron_to_hf.py`` writes, verified there)."""
    gguf = _gguf()
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as scratch:
        directory = Path(scratch) / "tokenizer"
        exported = export_hf_tokenizer(tokenizer, chat_format, str(directory), template)
        spec = json.loads((directory / TOKENIZER_JSON).read_text(encoding="utf-8"))
        pre = None
        if isinstance(tokenizer, SentencePieceTokenizer):
            base = tokenizer.base_vocab_size
            added = {t: i for t, i in tokenizer.special_tokens.items() if i >= base}
            (directory / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
            vocab = gguf.vocab.SentencePieceVocab(directory)
        else:
            try:
                vocab = gguf.vocab.BpeVocab(directory)
            except FileNotFoundError:
                raise TokenizerError(
                    f"the tokenizer {tokenizer.source_file} is neither byte-level BPE nor "
                    "SentencePiece; llama.cpp's tokenizer models cannot reproduce it") from None
            pre = pre_tokenizer_name(spec)
            if pre is None:
                logger.warning("llama.cpp knows no pre-tokenizer like this tokenizer.json's "
                               "(%s): writing 'default', and llama.cpp may split some texts "
                               "into other tokens", json.dumps(spec.get("pre_tokenizer"))[:200])
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        specials = set(tokenizer.special_tokens.values())
        for index in range(len(tokens)):  # our special tokens are never split: CONTROL
            if index in specials and types[index] in (gguf.TokenType.NORMAL,
                                                      gguf.TokenType.USER_DEFINED):
                types[index] = gguf.TokenType.CONTROL
        if len(tokens) != tokenizer.vocab_size:
            raise TokenizerError(f"the tokenizer {tokenizer.source_file}: llama.cpp's form has "
                                 f"{len(tokens)} tokens, ours {tokenizer.vocab_size}")
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        if vocab.tokenizer_model == "llama":
            writer.add_token_scores(scores)
            # llama.cpp puts the dummy "▁" before every text after a special token when
            # add_space_prefix is on; ours only at a document's start unless the export
            # says every piece (a chat prompt starts with a special token either way)
            writer.add_add_space_prefix(exported["dummy_prefix"].startswith("before every"))
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2",
                                    n_vocab=len(tokens))
        add_bos = bool(tokenizer.adds_bos and tokenizer.bos_id is not None)
        special.add_special_token["bos"] = add_bos
        special.add_special_token["eos"] = False
        if tokenizer.bos_id is not None:
            special.special_token_ids["bos"] = tokenizer.bos_id
        special.special_token_ids["eos"] = eos_ids[0] if tokenizer.eos_id is None \
            else tokenizer.eos_id
        if tokenizer.pad_id is not None:
            special.special_token_ids["pad"] = tokenizer.pad_id
        special.add_to_gguf(writer, quiet=True)
        stop = [i for i in eos_ids if i != special.special_token_ids["eos"]]
        if stop:  # the chat format's end of turn (<|im_end|>, <|eot_id|>)
            writer.add_eot_token_id(stop[0])
    return {"model": vocab.tokenizer_model, "pre": pre, "add_bos": add_bos}
