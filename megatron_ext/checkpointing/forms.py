"""Which of the three checkpoint forms a path holds, and its run config, from its files
alone: no torch.

Why a room of its own: deciding what a run loads (``training/plan.py``), what an
adapter checkpoint's base is (``adapters``) and where a checkpoint's weights are
(``vocab``) only needs file names and JSON; the readers of each form import torch.
Keeping the detection here lets the run plan be resolved, and tested, before torch
is imported. Megatron-LLM's legacy run config is the one exception: it lives in a
pickle, read by ``legacy`` (torch).
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_ext.checkpointing.run_config import load_run_config
from megatron_ext.checkpointing.tracker import (
    TRACKER,
    iteration_dir,
    iteration_dirname,
    latest_iteration,
    tracker_text,
)
from megatron_ext.errors import CheckpointError

UNSHARDED_MARKER = "unsharded.json"  # the unsharded file set's index (``unsharded.MARKER``)


def is_unsharded(path: str) -> bool:
    """An unsharded safetensors file set (``unsharded.py``)."""
    return os.path.isfile(os.path.join(path, UNSHARDED_MARKER))


def is_legacy(path: str) -> bool:
    """A tracker naming ``iter_XXXXXXX``/``release`` that holds ``mp_rank_*`` directories
    (Megatron-LLM's per-rank layout).

    Never raises: a corrupt tracker just means "not legacy" here.
    """
    text = tracker_text(path)
    if text is None:
        return False
    name = "release" if text == "release" else \
        iteration_dirname(int(text)) if text.isdigit() else ""
    directory = os.path.join(path, name)
    return bool(name) and os.path.isdir(directory) and any(
        entry.startswith("mp_rank_") for entry in os.listdir(directory))


def checkpoint_directory(load: Optional[str]) -> Optional[str]:
    """The directory holding the weights: ``load`` itself, its latest ``iter_*``, or None
    when ``load`` holds no checkpoint (yet)."""
    if not load or not os.path.isdir(load):
        return None
    if is_unsharded(load) or is_legacy(load):
        return load
    iteration = latest_iteration(load)
    return iteration_dir(load, iteration) if iteration is not None else None


def run_config_of(root: str) -> Optional[dict]:
    """The run config saved with the latest checkpoint in ``root`` (dist or unsharded); None
    for a Megatron-LLM legacy checkpoint, whose settings live in a pickle
    (``sources.read_run_config`` reads every form)."""
    if is_unsharded(root):
        return load_run_config(root)
    if is_legacy(root):
        return None
    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {root} (no {TRACKER})")
    return load_run_config(iteration_dir(root, iteration))
