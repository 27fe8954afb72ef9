"""The configs of HF import, HF export and resharding, with their flags.

Why a room of their own: ``tools/hf_to_megatron.py``, ``tools/megatron_to_hf.py`` and
``tools/checkpoint_util.py`` derive their parsers from these dataclasses (help text in
the field metadata, objects built by keyword), and ``--help`` and every flag error must
come back before torch is imported. The modules that do the work (``hf_import``,
``hf_export``, ``reshard``) import torch, so the configs live here, where nothing does;
those modules re-export them under their old names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_ext.cli import option, parse_size
from megatron_ext.models.families import hf_family_names

# the --dtype choices; hf_import.DTYPES maps them to torch dtypes
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def shard_size(default: str, help: str) -> Any:
    """A ``max_shard_bytes`` field: set by ``--max_shard_size`` as ``2GB``, ``500MB`` or a
    byte count, held in bytes. A bad size is a ConfigError raised while parsing (argparse
    passes it on: it is not a ValueError), so it comes back before torch is imported."""
    return option(parse_size(default), f"{help} (default {default})",
                  names=("--max_shard_size",), type=parse_size)


@dataclass(frozen=True)
class ImportConfig:
    """``tools/hf_to_megatron.py``: a Hugging Face model -> an unsharded checkpoint."""

    model_path: str = option(help="Hugging Face model directory (config.json, *.safetensors or "
                                  "*.bin, tokenizer files), or a .gguf file")
    out: str = option(help="checkpoint directory to create")
    model_name: Optional[str] = option(None, "model family (default: detected from "
                                             "config.json)", choices=hf_family_names())
    vocab_extra_ids_list: Optional[str] = option(
        None, "comma-separated special tokens to add, e.g. '<|im_start|>,<|im_end|>' (same "
              "value as for preprocessing)")
    tokenizer_type: Optional[str] = option(
        None, "SentencePieceTokenizer or HFTokenizer (default: tokenizer.model if the "
              "directory has one, else tokenizer.json)")
    vocab_file: Optional[str] = option(
        None, "tokenizer to use instead of the model directory's own")
    dtype: Optional[str] = option(None, "store weights in this dtype (default: as in the "
                                        "checkpoint)", choices=DTYPE_CHOICES)
    max_shard_bytes: int = shard_size("2GB", "largest output file; memory use is about one "
                                             "layer plus one shard")
    overwrite: bool = option(False, "replace an existing --out")
    progress: bool = option(True, "no progress bar")


@dataclass(frozen=True)
class ExportConfig:
    """``tools/megatron_to_hf.py``: any project checkpoint -> a Hugging Face directory."""

    load: str = option(help="checkpoint: a run's --save directory, an unsharded checkpoint, "
                            "or a legacy Megatron-LLM checkpoint; a LoRA/DoRA run's adapter "
                            "checkpoint exports its base with the adapters merged in")
    out: str = option(help="Hugging Face directory to create")
    adapter_only: bool = option(
        False, "with an adapter checkpoint: write only the adapters, in the Hugging Face PEFT "
               "layout (adapter_config.json + adapter_model.safetensors, the tokenizer) that "
               "peft.AutoPeftModelForCausalLM.from_pretrained(OUT) loads with its base (a "
               "GGUF base, or one that gained tokens, exported as a Hugging Face model)")
    base: Optional[str] = option(
        None, "with an adapter checkpoint: its base checkpoint, when the recorded one has "
              "moved (it must hold the same weights)")
    dtype: Optional[str] = option(
        None, "weights dtype in the export (default: the precision the model was trained in, "
              "else the dtype it was imported in, else fp32)", choices=DTYPE_CHOICES)
    iteration: Optional[int] = option(None, "export this iteration instead of the latest")
    chat_format: Optional[str] = option(
        None, "chat template to write (chatml, megatron-llm, llama3, alpaca, or none); "
              "default: the training data's, from its -meta.json, else chatml when the "
              "tokenizer has its tokens")
    prompt_template: Optional[str] = option(
        None, "with --chat_format template: the preprocessing --prompt_template")
    vocab_file: Optional[str] = option(
        None, "tokenizer file, when the one named in the checkpoint has moved")
    max_shard_bytes: int = shard_size("5GB", "largest safetensors file")
    overwrite: bool = option(False, "replace an existing --out")
    progress: bool = option(True, "no progress bar")


# the --outtype choices of tools/megatron_to_gguf.py (llama.cpp's names)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFExportConfig:
    """``tools/megatron_to_gguf.py``: any project checkpoint -> one GGUF file for llama.cpp."""

    load: str = option(help="checkpoint: a run's --save directory, an unsharded checkpoint, "
                            "or a legacy Megatron-LLM checkpoint; a LoRA/DoRA run's adapter "
                            "checkpoint exports its base with the adapters merged in")
    out: str = option(help="the .gguf file to write")
    outtype: str = option("f16", "tensor type of the matrices (llama.cpp's names; norms and "
                                 "biases stay f32)", choices=GGUF_OUTTYPES)
    base: Optional[str] = option(
        None, "with an adapter checkpoint: its base checkpoint, when the recorded one has "
              "moved (it must hold the same weights)")
    iteration: Optional[int] = option(None, "export this iteration instead of the latest")
    chat_format: Optional[str] = option(
        None, "chat template to write (chatml, megatron-llm, llama3, alpaca, or none); "
              "default: the training data's, else chatml when the tokenizer has its tokens")
    prompt_template: Optional[str] = option(
        None, "with --chat_format template: the preprocessing --prompt_template")
    vocab_file: Optional[str] = option(
        None, "tokenizer file, when the one named in the checkpoint has moved")
    overwrite: bool = option(False, "replace an existing --out", names=("--force",),
                             aliases=("--overwrite",))
    progress: bool = option(True, "no progress bar")


@dataclass(frozen=True)
class ReshardConfig:
    """``tools/checkpoint_util.py``: merge a checkpoint into the unsharded form, or split one
    into a target TP/PP layout."""

    load: str = option(help="checkpoint to read (format detected); a LoRA/DoRA adapter "
                            "checkpoint is merged into its base")
    out: str = option(help="directory to create")
    base: Optional[str] = option(
        None, "with an adapter checkpoint: its base checkpoint, when the recorded one has "
              "moved (it must hold the same weights)")
    iteration: Optional[int] = option(None, "read this iteration instead of the latest")
    include_optimizer: bool = option(
        True, "weights only (drop optimizer state and training position)",
        names=("--no_optimizer",))
    target_tp: int = option(1, "split: tensor parallel size of the result",
                            aliases=("--target_tensor_parallel_size",))
    target_pp: int = option(1, "split: pipeline parallel size of the result",
                            aliases=("--target_pipeline_parallel_size",))
    format: str = option("dist", "split: output format (default dist)",
                         choices=("dist", "legacy"))
    max_shard_bytes: int = shard_size("2GB", "merge: largest output file")
    overwrite: bool = option(False, "replace an existing --out")
