"""Checkpoints in three forms, loaded at any TP/PP; this face only re-exports, lazily.

Why lazy (PEP 562): the rooms below import torch, and importing any
``megatron_ext.checkpointing.*`` module runs this face first. The tools' configs
(``options``) must load without torch, so a name here imports its room on first
use; ``from megatron_ext.checkpointing import load_checkpoint`` works as before.

Rooms (each imports the others directly, never through this face):

* ``tracker``: ``latest_checkpointed_iteration.txt`` and the ``iter_*`` names;
* ``run_config``: ``run_config.json`` read and written, the tokenizer it names;
* ``state``: what a checkpoint restores into (``TrainState``, ``Progress``) and
  the model-shape check every loader makes;
* ``dist``: ``dist_checkpointing`` run directories, saved and loaded (the loader
  also takes the other two forms);
* ``unsharded``: the unsharded safetensors file set;
* ``legacy``: Megatron-LLM's per-rank layout (a package split by job);
* ``sources``: any checkpoint as unsharded tensors, a layer at a time;
* ``hf_import``, ``hf_export``, ``hf_tokenizer``: Hugging Face models and
  tokenizers in and out; ``reshard``: merge and split; ``vocab``: embedding rows;
* ``options``: the configs of import, export and reshard, with their flags (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_ext.errors import CheckpointError

# each re-exported name -> the room that defines it (the one list of them)
_ROOMS = {
    "load_checkpoint": "dist", "save_checkpoint": "dist",
    "RUN_CONFIG": "run_config", "load_run_config": "run_config",
    "read_run_config": "sources",
    "OPTIMIZER_METADATA": "state", "Progress": "state", "TrainState": "state",
    "check_model_matches": "state",
    "TRACKER": "tracker", "iteration_dir": "tracker", "latest_iteration": "tracker",
    "write_tracker": "tracker",
}

__all__ = ["CheckpointError", *_ROOMS]


def __getattr__(name: str) -> Any:
    """A re-exported name, imported from its room on first use (then cached here).

    Anything else is an AttributeError, so ``from megatron_ext.checkpointing import
    hf_tokenizer`` still falls back to importing the submodule."""
    room = _ROOMS.get(name)
    if room is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{room}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ROOMS))
