"""The experiment's base model: found (never downloaded), imported once, its tokenizer.

Why here: preprocessing must use exactly the tokenizer the trainer will check
the data against. For a Hugging Face model or GGUF file that is the tokenizer
of its import, so the launcher imports the model into the import cache first
(the trainer then finds it there) and tokenizes with the import's tokenizer;
for a checkpoint of ours, the tokenizer it names.

Why one cache for every experiment (``EXPERIMENTS_DIR/.imported``, beside the
tokenization cache): an import is as large as the model, and it depends only on
the source's content and the import options (the entry's key, see
``checkpointing/import_cache.py``), not on the experiment; experiments on one base
share it, and ``--restart`` (which moves the experiment's folder aside) reuses it.

Why tokens are added without being asked: a base model without a chat template
is trained in ChatML (the default format), whose ``<|im_start|>``/``<|im_end|>`` a
plain Llama/Mistral base lacks. The import adds the tokens the data's format
needs and the tokenizer lacks (new embedding and output rows start at the mean
of the existing rows); the trainer's tokenizer, the data and the export follow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from megatron_ext.errors import ConfigError
from megatron_ext.models.import_sources import import_source_kind
from megatron_ext.tokenizers import TokenizerConfig, parse_extra_ids

if TYPE_CHECKING:
    from megatron_ext.launch.options import SFTConfig

logger = logging.getLogger(__name__)

IMPORT_CACHE = ".imported"  # in the experiments folder, beside the tokenized data's ".tokenized"


PLANNED_IMPORT = "<import>"  # a planned base model's import, not made yet


@dataclass(frozen=True)
class BaseModel:
    source: str  # what --load of finetune.py gets: a model directory, a .gguf file, a checkpoint
    imported: Optional[str]  # the import in the cache (Hugging Face / GGUF sources)
    tokenizer: Optional[TokenizerConfig]  # None: the import's own, planned
    model: dict  # the model's arguments (run config "model"; {} for the hf backend)
    extra_ids: Optional[str] = None  # the tokens the import added (its --vocab_extra_ids_list)
    backend: str = "megatron"  # hf: trained as it is (no family claims it, or --backend hf)


def import_cache_dir(experiments_dir: str) -> str:
    """The import cache every experiment of ``experiments_dir`` shares."""
    return os.path.join(os.path.abspath(experiments_dir), IMPORT_CACHE)


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
            f"hf download {model_id}) or pass its directory") from None


def hf_backend_model(source: str) -> Optional[str]:
    """The ``model_type`` of a Hugging Face directory that no family claims (the trainer's
    ``--backend auto`` trains it on the hf backend, without importing it); else None."""
    from megatron_ext.models.families import family_for_hf_config
    from megatron_ext.models.import_sources import HF_DIRECTORY, read_hf_config

    if import_source_kind(source) != HF_DIRECTORY:
        return None
    hf_config = read_hf_config(source)
    model_type = hf_config.get("model_type")
    return model_type if model_type and family_for_hf_config(hf_config) is None else None


def on_hf_backend(source: str, backend: str) -> bool:
    """Whether ``--backend`` (auto, megatron or hf) trains the Hugging Face directory or GGUF
    file ``source`` on the hf backend; a choice the trainer would refuse is refused here,
    before anything is imported."""
    if backend == "hf":
        return True
    unclaimed = hf_backend_model(source)
    if unclaimed and backend == "megatron":
        raise ConfigError(f"--backend megatron: no family in models/families claims "
                          f"{source} (model_type {unclaimed!r}); train it with --backend hf "
                          "(or auto), or add a family file for it")
    return unclaimed is not None


def hf_backend_reason(source: str, backend: str) -> str:
    """Why ``source`` trains on the hf backend (for the log and the dry run's plan)."""
    unclaimed = hf_backend_model(source)
    if backend == "hf" or not unclaimed:
        return "--backend hf"
    return f"no family claims model_type {unclaimed!r}"


def _hf_backend_base(source: str, extra_ids: Optional[str], experiments_dir: str,
                     backend: str) -> BaseModel:
    """The base as the hf backend trains it: the model as it is, with its own tokenizer (a
    GGUF file's rebuilt once into the shared import cache, which the trainer then reads
    with --vocab_file)."""
    from megatron_ext.training.config import CheckpointArgs
    from megatron_ext.tokenizers import TokenizerArgs
    from megatron_ext.training.plan import model_dir_tokenizer

    tokenizer = model_dir_tokenizer(
        TokenizerArgs(tokenizer_type=None, vocab_extra_ids_list=extra_ids), source,
        CheckpointArgs(import_cache_dir=import_cache_dir(experiments_dir)))
    logger.info("%s: trained as it is on the hf backend (%s; nothing imported)", source,
                hf_backend_reason(source, backend))
    return BaseModel(source, None, tokenizer.config(), {}, extra_ids, backend="hf")


def planned_base(hf_model_id: Optional[str], load: Optional[str], experiments_dir: str,
                 backend: str = "auto") -> BaseModel:
    """The base model as the training will see it, from its config alone: a Hugging Face
    ``config.json``, a GGUF file's metadata, or the run config of a checkpoint of ours (no
    torch, no weights read, nothing imported; a Megatron-LLM legacy checkpoint's pickled
    settings are read with torch). Its ``imported`` is a placeholder: the import is not
    made. So the trainer's checks of the model's shape run before anything is imported.
    (On the hf backend a GGUF file's tokenizer is rebuilt into the import cache: the plan
    names it.)"""
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run

    if hf_model_id is not None:
        from megatron_ext.models.hf_config import model_args_from_hf_config
        from megatron_ext.models.import_sources import GGUF_FILE, read_hf_config

        source = resolve_hf_model_id(hf_model_id)
        if on_hf_backend(source, backend):
            return _hf_backend_base(source, None, experiments_dir, backend)
        if import_source_kind(source) == GGUF_FILE:
            from megatron_ext.models.gguf_checkpoint import GGUFModel

            model = model_args_from_hf_config(GGUFModel(source).config, source=source)
        else:
            model = model_args_from_hf_config(read_hf_config(source),
                                              source=os.path.join(source, "config.json"))
        return BaseModel(source, PLANNED_IMPORT, None, model)
    if backend == "hf":
        raise ConfigError(f"--backend hf trains a Hugging Face model as it is: give it with "
                          f"--hf_model_id (a model directory or a .gguf file); --load {load} "
                          "is a checkpoint of this project (megatron's)")
    run_config = _checkpoint_run_config(load, "--load")
    return BaseModel(load, None, tokenizer_config_from_run(load, run_config),
                     run_config["model"])


def tokens_to_add(source: str, extra_ids: Optional[str], chat_format: Optional[str]
                  ) -> Optional[str]:
    """The import's ``--vocab_extra_ids_list``: ``extra_ids`` and the special tokens that
    the chat format (None: the default for the model's tokenizer) needs and the model's
    tokenizer lacks (logged)."""
    from megatron_ext.checkpointing.hf_import import ImportConfig, missing_chat_tokens

    missing = missing_chat_tokens(ImportConfig(source, "", vocab_extra_ids_list=extra_ids),
                                  chat_format)
    if not missing:
        return extra_ids
    logger.info("%s lacks the special tokens %s of the %s chat format: adding them to the "
                "vocabulary (new embedding and output rows start at the mean of the "
                "existing rows; the exported tokenizer and its chat template carry them)",
                source, ", ".join(missing), chat_format or "default (chatml)")
    return ",".join((*parse_extra_ids(extra_ids), *missing))


def prepare_base(config: "SFTConfig") -> BaseModel:
    """The base model of ``config``: a Hugging Face or GGUF source imported into the
    shared import cache (or found there), or a checkpoint of ours as it is."""
    from megatron_ext.checkpointing.import_cache import ImportOptions, ensure_imported
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run

    load = config.load
    if config.hf_model_id is not None:
        source = resolve_hf_model_id(config.hf_model_id)
        extra_ids = tokens_to_add(source, config.vocab_extra_ids_list, config.chat_format)
        if on_hf_backend(source, config.backend):
            return _hf_backend_base(source, extra_ids, config.experiments_dir, config.backend)
        cached = ensure_imported(source, import_cache_dir(config.experiments_dir),
                                 ImportOptions(extra_ids), announce=True,
                                 progress=config.progress)
        return BaseModel(source, cached.path,
                         tokenizer_config_from_run(cached.path, cached.run_config),
                         cached.run_config["model"], extra_ids)
    return planned_base(None, load, config.experiments_dir, config.backend)  # nothing to import


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
    from megatron_ext.errors import CheckpointError
    from megatron_ext.training.plan import read_run_config  # no torch

    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} does not exist" if not os.path.exists(path) else
                          f"{flag} {path}: neither a Hugging Face model directory, a .gguf "
                          "file, nor a checkpoint of this project")
    try:
        return read_run_config(path)
    except CheckpointError as exc:
        raise ConfigError(f"{flag} {path}: not a checkpoint of this project ({exc})") from None
