"""Is a directory a legacy Megatron-LM / Megatron-LLM per-rank checkpoint?

Kept apart from ``legacy.py`` so that every loader can ask cheaply, without
importing the legacy reader.
"""

from __future__ import annotations

import os


def is_legacy(path: str) -> bool:
    """A tracker naming ``iter_XXXXXXX``/``release`` that holds ``mp_rank_*`` directories."""
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return False
    with open(tracker, encoding="utf-8") as handle:
        text = handle.read().strip()
    name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else ""
    directory = os.path.join(path, name)
    return bool(name) and os.path.isdir(directory) and any(
        entry.startswith("mp_rank_") for entry in os.listdir(directory))
