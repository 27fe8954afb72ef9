"""The experiment's base model: found (never downloaded), imported once, its tokenizer.

Why here: preprocessing must use exactly the tokenizer the trainer will check
the data against. For a Hugging Face model or GGUF file that is the tokenizer
of its import, so the launcher imports the model into the experiment's import
cache first (the trainer then finds it there) and tokenizes with the import's
tokenizer; for a checkpoint of ours, the tokenizer it names.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_ext.errors import ConfigError
from megatron_ext.models.import_sources import import_source_kind
from megatron_ext.tokenizers import TokenizerConfig


@dataclass(frozen=True)
class BaseModel:
    source: str  # what --load of finetune.py gets: a model directory, a .gguf file, a checkpoint
    imported: Optional[str]  # the import in the cache (Hugging Face / GGUF sources)
    tokenizer: TokenizerConfig
    model: dict  # the model's arguments (run config "model")


def resolve_hf_model_id(model_id: str) -> str:
    """A local directory or .gguf file as given; else a hub id looked up in the local
    Hugging Face cache only."""
    if os.path.exists(model_id):
        if import_source_kind(model_id) is None:
            raise ConfigError(f"--hf_model_id {model_id}: neither a Hugging Face model "
                              "directory (config.json and weights) nor a .gguf file")
        return model_id
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise ConfigError(f"--hf_model_id {model_id} does not exist as a path") from None
    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - every failure means: not in the cache
        raise ConfigError(
            f"--hf_model_id {model_id}: not a local path, and not in the local Hugging Face "
            f"cache ({HF_HUB_CACHE}); nothing is downloaded: download it first (e.g. "
            "huggingface-cli download) or pass its directory") from None


def prepare_base(hf_model_id: Optional[str], load: Optional[str], import_cache: str,
                 extra_ids: Optional[str], progress: bool) -> BaseModel:
    from megatron_ext.checkpointing.import_cache import ImportOptions, ensure_imported
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run

    if hf_model_id is not None:
        source = resolve_hf_model_id(hf_model_id)
        cached = ensure_imported(source, import_cache, ImportOptions(extra_ids), announce=True,
                                 progress=progress)
        return BaseModel(source, cached.path,
                         tokenizer_config_from_run(cached.path, cached.run_config),
                         cached.run_config["model"])
    run_config = _checkpoint_run_config(load, "--load")
    return BaseModel(load, None, tokenizer_config_from_run(load, run_config), run_config["model"])


@contextlib.contextmanager
def tokenizer_of_model(path: str, extra_ids: Optional[str] = None) -> Iterator[TokenizerConfig]:
    """The tokenizer the trainer uses with the model ``path`` (``--tokenizer_from``): for a
    Hugging Face directory or a GGUF file, the one its import carries (the importer's own
    choice, :func:`~megatron_ext.checkpointing.hf_import.model_tokenizer_config`, without
    importing the weights; a GGUF file's tokenizer lives in a temporary folder while the
    context lasts); for a checkpoint of ours, the one it names. ``extra_ids``: the
    ``--vocab_extra_ids_list`` of the import (a checkpoint keeps its own)."""
    if import_source_kind(path) is not None:
        from megatron_ext.checkpointing.hf_import import model_tokenizer_config, open_model_source
        from megatron_ext.checkpointing.options import ImportConfig

        if not os.path.exists(path):
            raise ConfigError(f"--tokenizer_from {path} does not exist")
        with open_model_source(path) as source:
            yield model_tokenizer_config(
                ImportConfig(model_path=path, out="", vocab_extra_ids_list=extra_ids), source)
        return
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run

    run_config = _checkpoint_run_config(path, "--tokenizer_from")
    if extra_ids:
        raise ConfigError("--vocab_extra_ids_list with --tokenizer_from a checkpoint: the "
                          "checkpoint keeps the tokenizer it was trained with")
    yield tokenizer_config_from_run(path, run_config)


def _checkpoint_run_config(path: str, flag: str) -> dict:
    """The run config of the checkpoint of ours in ``path`` (given with ``flag``)."""
    from megatron_ext.checkpointing.sources import read_run_config
    from megatron_ext.errors import CheckpointError

    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} does not exist" if not os.path.exists(path) else
                          f"{flag} {path}: neither a Hugging Face model directory, a .gguf "
                          "file, nor a checkpoint of this project")
    try:
        return read_run_config(path)
    except CheckpointError as exc:
        raise ConfigError(f"{flag} {path}: not a checkpoint of this project ({exc})") from None
