"""Unpickling files written by a code base we do not have (Megatron-LLM's ``args``).

Safety: legacy files are pickles, read by a restricted unpickler
(``checkpointing/pickles.py``) that never imports or calls a name outside its
allow-list: such names (e.g. ``megatron.model.enums.PositionEmbeddingType``, or
``os.system`` in a hostile file) become inert :class:`LegacyObject` stand-ins.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Self

from megatron_ext.checkpointing.pickles import load_pickled
from megatron_ext.errors import CheckpointError

logger = logging.getLogger(__name__)


class LegacyObject:
    """Inert stand-in for a class a legacy pickle names but this environment lacks.

    Why: a Megatron-LLM ``args`` namespace holds e.g.
    ``megatron.model.enums.PositionEmbeddingType.rotary``; megatron-core has no
    ``megatron.model``, so plain unpickling fails. Enum members arrive as
    ``cls(value)`` (kept in ``args``), other objects as ``__new__`` plus
    ``__setstate__`` (kept in ``state``).
    """

    legacy_module = ""
    legacy_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<legacy {self.legacy_module}.{self.legacy_name} args={self.args!r}>"


_STAND_INS: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
    """The inert class that replaces ``module.name`` (one per name, kept for the process)."""
    key = (module, name)
    if key not in _STAND_INS:
        logger.debug("legacy checkpoint names %s.%s, which is not loaded from checkpoint "
                     "files: using an inert stand-in", module, name)
        _STAND_INS[key] = type(name, (LegacyObject,),
                               {"legacy_module": module, "legacy_name": name})
    return _STAND_INS[key]


def load_legacy_file(path: str) -> dict:
    """``torch.load`` one rank file on CPU, restricted; a missing or damaged file is a
    CheckpointError.

    Nothing in the file runs: tensors, containers and ``argparse.Namespace`` load as
    themselves, every other name a pickle gives (Megatron-LLM's enums, or ``os.system``
    in a malicious file) becomes an inert :class:`LegacyObject` (``pickles.load_pickled``).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"legacy checkpoint file {path} is missing (every tensor- and "
                              "pipeline-parallel rank needs its file)")
    try:  # memory-mapped where the format allows: tensors are read when used
        loaded = load_pickled(path, stand_in=stand_in, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- zip errors, EOFError, UnpicklingError...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"legacy checkpoint file {path} cannot be loaded "
                              f"({type(exc).__name__}: {detail}); it is truncated or corrupt, "
                              "copy it again from the source") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a Megatron "
                              "checkpoint dict")
    return loaded
