"""Hugging Face model directory or GGUF file -> unsharded megatron-core checkpoint.

Why an unsharded checkpoint: it is written one layer at a time (peak memory
is one layer plus one output shard, never the model) and any TP/PP starts
from it by reading only its own slices (``finetune.py --load OUT --finetune
--use_checkpoint_args``). The tokenizer files travel with it, and its
``run_config.json`` carries the model shape.

Why a :class:`ModelSource`: a directory and a GGUF file differ only in where
the HF config, the HF-named tensors and the tokenizer files come from; the
conversion itself is the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_ext.checkpointing.options import ImportConfig  # (lives there: no torch)
from megatron_ext.checkpointing.run_config import default_chat_format
from megatron_ext.checkpointing.unsharded import UnshardedWriter
from megatron_ext.data.chat_formats import FORMATS
from megatron_ext.errors import TokenizerError
from megatron_ext.models.gguf_checkpoint import GGUFModel, is_gguf_path
from megatron_ext.models.hf_checkpoint import HFWeights, WeightSource
from megatron_ext.models.hf_config import hf_adapter, model_args_from_hf_config
from megatron_ext.models.import_sources import read_hf_config
from megatron_ext.tokenizers import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG,
    HUGGINGFACE,
    SENTENCEPIECE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TokenizerConfig,
    build_tokenizer,
    parse_extra_ids,
)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE,
                   SPECIAL_TOKENS_MAP, GENERATION_CONFIG)


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_hf` wrote."""

    out: str
    family: str
    layers: int
    hf_vocab_rows: int  # embedding rows in the Hugging Face model
    vocab_size: int  # the tokenizer's, with the added tokens
    new_token_rows: int  # rows added, initialised to the mean embedding
    dtype: str
    bytes: int
    tokenizer_files: list[str]
    seconds: float
    weights_format: str  # safetensors | bin | gguf


@dataclass(frozen=True)
class ModelSource:
    """What the conversion reads, wherever the model comes from."""

    hf_config: dict  # config.json's content
    config_file: str  # named in messages about the config
    weights: WeightSource
    record: dict  # run_config["source"]
    tokenizer_dir: Callable[[], str]  # the folder of the model's own tokenizer files


@contextlib.contextmanager
def open_model_source(model_path: str) -> Iterator[ModelSource]:
    """An HF directory as it is; a GGUF file with its tokenizer rebuilt (only when asked
    for) in a temporary folder that lives as long as the source."""
    if not is_gguf_path(model_path):
        hf_config = read_hf_config(model_path)
        yield ModelSource(hf_config, os.path.join(model_path, "config.json"),
                          HFWeights(model_path),
                          {"hf_model_path": os.path.abspath(model_path),
                           "model_type": hf_config.get("model_type"),
                           "dtype": str(hf_config.get("dtype") or hf_config.get("torch_dtype"))},
                          lambda: model_path)
        return
    model = GGUFModel(model_path)
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as folder:
        @functools.cache
        def tokenizer_dir() -> str:
            model.write_tokenizer(folder)
            return folder

        yield ModelSource(model.config, model_path, model.weights, model.record(),
                          tokenizer_dir)


def _tokenizer_source(config: ImportConfig, source: ModelSource) -> tuple[str, str]:
    return tokenizer_source(config.vocab_file, config.tokenizer_type, source.tokenizer_dir,
                            config.model_path)


def tokenizer_source(vocab_file: Optional[str], tokenizer_type: Optional[str],
                     model_dir: Callable[[], str], model_path: str) -> tuple[str, str]:
    """(tokenizer type, file) of a model: ``vocab_file`` when given, else the model's own
    (``model_dir()``: its folder of tokenizer files), tokenizer.model before
    tokenizer.json."""
    if vocab_file:
        kind = tokenizer_type or (
            SENTENCEPIECE if vocab_file.endswith(".model") else HUGGINGFACE)
        return kind, vocab_file
    folder = model_dir()
    sp_file = os.path.join(folder, SENTENCEPIECE_FILE)
    json_file = os.path.join(folder, TOKENIZER_JSON)
    if tokenizer_type:
        wanted = TokenizerConfig(tokenizer_type, "").tokenizer_type
        return wanted, sp_file if wanted == SENTENCEPIECE else folder
    if os.path.exists(sp_file):
        return SENTENCEPIECE, sp_file
    if os.path.exists(json_file):
        return HUGGINGFACE, folder
    raise TokenizerError(f"{model_path} has no tokenizer.model or tokenizer.json: pass "
                         "the tokenizer with --vocab_file")


def model_tokenizer_config(config: ImportConfig, source: ModelSource) -> TokenizerConfig:
    """The tokenizer an import of ``source`` carries: the model's own ids (none of
    Megatron-LLM's SentencePiece additions, <CLS> <SEP> ...) and the extra ids."""
    kind, vocab_file = _tokenizer_source(config, source)
    return TokenizerConfig(kind, vocab_file, parse_extra_ids(config.vocab_extra_ids_list),
                           megatron_llm_specials=False)


def _check_tokenizer(tokenizer, hf_config: dict, rows: int, source: str,
                     config_file: str = "config.json") -> None:
    """Refuse a tokenizer that does not belong to the model."""
    problems = []
    if tokenizer.base_vocab_size > rows:
        problems.append(f"it has {tokenizer.base_vocab_size} tokens but the model only "
                        f"{rows} embedding rows")
    bos, eos = hf_config.get("bos_token_id"), hf_config.get("eos_token_id")
    if bos is not None and tokenizer.bos_id is not None and tokenizer.bos_id != bos:
        problems.append(f"its BOS id is {tokenizer.bos_id}, {config_file} says {bos}")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and tokenizer.eos_id is not None and tokenizer.eos_id not in eos_ids:
        # finetunes often change the EOS in config.json only: worth a warning, not a refusal
        logger.warning("the tokenizer's EOS id %d is not %s's %s; check that %s is "
                       "the model's tokenizer", tokenizer.eos_id, config_file, eos, source)
    if problems:
        raise TokenizerError(f"the tokenizer {source} does not match the model "
                             f"({'; '.join(problems)}); pass the model's own tokenizer")


def missing_chat_tokens(config: ImportConfig, chat_format: Optional[str]) -> tuple[str, ...]:
    """The special tokens that ``chat_format`` needs (None: the format a model without one
    gets, :func:`default_chat_format`) and that the tokenizer :func:`import_hf` would give
    the model of ``config`` (its extra tokens included) lacks; nothing is converted."""
    with open_model_source(config.model_path) as source:
        kind, vocab_file = _tokenizer_source(config, source)
        tokenizer = build_tokenizer(TokenizerConfig(
            kind, vocab_file, parse_extra_ids(config.vocab_extra_ids_list),
            megatron_llm_specials=False))
        name = chat_format or default_chat_format(tokenizer)
    wanted = FORMATS[name].required_tokens if name in FORMATS else ()
    return tuple(token for token in wanted if token not in tokenizer.special_tokens)


def import_hf(config: ImportConfig) -> ImportSummary:
    """Convert; returns a summary. Nothing is left at ``config.out`` on failure."""
    with open_model_source(config.model_path) as source:
        return _convert(config, source)


def _convert(config: ImportConfig, source: ModelSource) -> ImportSummary:
    start = time.perf_counter()
    hf_config, weights = source.hf_config, source.weights
    model = model_args_from_hf_config(hf_config, config.model_name, source.config_file)
    adapter = hf_adapter(hf_config, source.config_file)
    layers, heads, kv = model["num_layers"], model["num_attention_heads"], \
        model["num_attention_heads_kv"]
    tied = bool(model["tie_embeddings"])
    needed = adapter.embedding_names(tied)
    for layer in range(layers):
        needed += adapter.layer_names(layer)
    weights.require(needed)
    word_embeddings = needed[0]  # the adapter lists them first
    rows = weights.shape(word_embeddings)[0]

    tokenizer_config = model_tokenizer_config(config, source)
    kind, vocab_file = tokenizer_config.tokenizer_type, tokenizer_config.vocab_file
    tokenizer = build_tokenizer(tokenizer_config)
    _check_tokenizer(tokenizer, hf_config, rows, vocab_file, source.config_file)
    vocab_rows = max(rows, tokenizer.vocab_size)
    dtype = DTYPES[config.dtype] if config.dtype else None

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor

    from megatron_ext.cli import ProgressBar

    with UnshardedWriter(config.out, config.max_shard_bytes, config.overwrite) as writer:
        first = adapter.embeddings_to_megatron(
            {n: weights.get(n) for n in adapter.embedding_names(tied)}, tokenizer.vocab_size,
            vocab_rows, tied)
        for name, tensor in first.items():
            writer.add(name, cast(tensor))
        del first
        bar = ProgressBar(total=layers, desc="converting layers", unit="layer",
                       enabled=config.progress)
        for layer in bar.wrap(range(layers)):
            group = {n: weights.get(n) for n in adapter.layer_names(layer)}
            for name, tensor in adapter.layer_to_megatron(group, layer, heads, kv).items():
                writer.add(name, cast(tensor))
        tokenizer_dir = os.path.join(writer.staging, "tokenizer")
        os.makedirs(tokenizer_dir)
        copied = _copy_tokenizer_files(vocab_file, tokenizer_dir)
        tok_file = os.path.basename(vocab_file) if kind == SENTENCEPIECE else ""
        run_config = {
            "model": model,
            "tokenizer_identity": tokenizer.identity(),
            "tokenizer": {"tokenizer_type": kind,
                          "vocab_file": os.path.join("tokenizer", tok_file).rstrip("/"),
                          "vocab_extra_ids_list": config.vocab_extra_ids_list,
                          **({"megatron_llm_specials": False} if kind == SENTENCEPIECE else {})},
            "source": dict(source.record),
        }
        # the final norm's dtype (HFAdapter.embedding_names lists it second)
        stored_dtype = str(cast(weights.get(needed[1])).dtype).replace("torch.", "")
        run_config["source"]["stored_dtype"] = stored_dtype  # the export's default dtype
        writer.finish({"vocab_size": tokenizer.vocab_size, "iteration": 0, "source": "hf",
                       "dtype": stored_dtype}, run_config)
    return ImportSummary(out=config.out, family=model["model_name"], layers=layers,
                         hf_vocab_rows=rows, vocab_size=tokenizer.vocab_size,
                         new_token_rows=max(0, tokenizer.vocab_size - rows), dtype=stored_dtype,
                         bytes=writer.tensors.total_bytes, tokenizer_files=copied,
                         seconds=time.perf_counter() - start, weights_format=weights.format)


def _copy_tokenizer_files(vocab_file: str, out_dir: str) -> list[str]:
    copied = []
    if os.path.isfile(vocab_file):
        shutil.copy2(vocab_file, out_dir)
        copied.append(os.path.basename(vocab_file))
    # the tokenizer's own settings (bos/eos), wherever the tokenizer came from
    source_dir = vocab_file if os.path.isdir(vocab_file) else os.path.dirname(vocab_file)
    for name in TOKENIZER_FILES:
        path = os.path.join(source_dir, name)
        if name not in copied and os.path.isfile(path):
            shutil.copy2(path, out_dir)
            copied.append(name)
    return copied
