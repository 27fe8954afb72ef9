"""Whether a path is a model to import (a Hugging Face directory, a GGUF file), by its files.

Why here, apart from the importer: ``finetune.py --load`` accepts such a model
as well as a checkpoint, and when it is one the model's shape and tokenizer
come from the import, which changes which flags are required. That is decided
while the flags are checked, before torch is imported, so the rule is a pure
look at file names on a floor that imports no torch; the import cache
(``checkpointing/import_cache.py``) and the importer then take the same path.
"""

from __future__ import annotations

import os
from typing import Optional

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
