"""Whether a path is a model to import (a Hugging Face directory, a GGUF file), by its files.

Why here, apart from the importer: ``finetune.py --load`` accepts such a model
as well as a checkpoint, and when it is one the model's shape and tokenizer
come from the import, which changes which flags are required. That is decided
while the flags are checked, before torch is imported, so the rule is a pure
look at file names on a floor that imports no torch; the import cache
(``checkpointing/import_cache.py``) and the importer then take the same path.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_ext.errors import UserError


class HFCheckpointError(UserError):
    """A Hugging Face model directory (or GGUF file) that cannot be read (here, with no
    torch, so that a model's config can be read before torch is imported)."""


HF_DIRECTORY = "hf"
GGUF_FILE = "gguf"


def import_source_kind(path: Optional[str]) -> Optional[str]:
    """``"hf"`` for a directory holding ``config.json`` (our checkpoints hold
    ``run_config.json``, never ``config.json``), ``"gguf"`` for a ``*.gguf`` path
    (existing or not: a missing one is reported by the import, naming it), else None."""
    if not path:
        return None
    if path.lower().endswith(".gguf") and not os.path.isdir(path):
        return GGUF_FILE
    if os.path.isfile(os.path.join(path, "config.json")):
        return HF_DIRECTORY
    return None


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise HFCheckpointError(f"--model_path {model_dir} is not a directory")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} is missing: --model_path must be a Hugging Face model "
                                "directory (config.json, weights, tokenizer files)") from None
    except (OSError, ValueError) as exc:
        raise HFCheckpointError(f"{path} is unreadable ({exc})") from None
