"""Where a legacy per-rank checkpoint keeps its files, and whether a directory is one.

Why apart: the reader and the writer name rank files the same way. Whether a
directory is one (``is_legacy``) is decided in ``checkpointing/forms.py`` with the
other forms, without torch.
"""

from __future__ import annotations

import os
import re

# is_legacy lives with the other forms' detection, which needs no torch (re-exported here)
from megatron_ext.checkpointing.forms import is_legacy  # noqa: F401
from megatron_ext.checkpointing.tracker import TRACKER, Iteration, read_tracker
from megatron_ext.errors import CheckpointError

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
DISTRIBUTED_OPTIMIZER_MODEL_FILE = "model_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def read_legacy_tracker(root: str) -> Iteration:
    """The iteration ``ROOT/latest_checkpointed_iteration.txt`` names (int or ``'release'``)."""
    iteration = read_tracker(root, allow_release=True)
    if iteration is None:
        raise CheckpointError(f"{os.path.join(root, TRACKER)} is missing: {root} is not a "
                              "Megatron checkpoint directory (pass iteration= to read one anyway)")
    return iteration


def rank_file(directory: str) -> str:
    for name in (MODEL_FILE, DISTRIBUTED_OPTIMIZER_MODEL_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return os.path.join(directory, MODEL_FILE)


def rank_dir(directory: str, tp_rank: int, pp_rank: int, pipeline: bool) -> str:
    name = f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" if pipeline else f"mp_rank_{tp_rank:02d}"
    return os.path.join(directory, name)


def scan_ranks(directory: str) -> tuple[int, int, bool]:
    """(TP, PP, pipeline-style names) from the rank directory names present."""
    plain, piped = [], []
    for name in os.listdir(directory):
        match = _RANK_DIR.match(name)
        if not match or not os.path.isdir(os.path.join(directory, name)):
            continue
        tp_rank, pp_rank = int(match.group(1)), match.group(2)
        if pp_rank is None:
            plain.append(tp_rank)
        else:
            files = set(os.listdir(os.path.join(directory, name)))
            if files == {"optim.pt"}:
                continue  # PP=1 distributed optimizer: mp_rank_XX_<dp rank>/optim.pt
            piped.append((tp_rank, int(pp_rank)))
    if plain:
        return max(plain) + 1, 1, False
    if piped:
        return max(t for t, _ in piped) + 1, max(p for _, p in piped) + 1, True
    raise CheckpointError(f"{directory} holds no mp_rank_XX or mp_rank_XX_YYY directories")

