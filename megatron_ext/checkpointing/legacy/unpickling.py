"""Unpickling files written by a code base we do not have (Megatron-LLM's ``args``).

Safety: legacy files are pickles, loaded with ``weights_only=False``, which can
run code embedded in the file: load only checkpoints you trust.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
from typing import Any, Self

import torch

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


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in _STAND_INS:
                logger.debug("legacy checkpoint names %s.%s, which is not importable here: "
                             "using an inert stand-in", module, name)
                _STAND_INS[key] = type(name, (LegacyObject,),
                                       {"legacy_module": module, "legacy_name": name})
            return _STAND_INS[key]


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("megatron_ext_legacy_pickle")
    module.__dict__.update({name: getattr(pickle, name) for name in dir(pickle)
                            if not name.startswith("__")})
    module.Unpickler = _LenientUnpickler
    module.load = lambda file, **kw: _LenientUnpickler(file, **kw).load()
    return module


def load_legacy_file(path: str) -> dict:
    """``torch.load`` one rank file on CPU; a missing or damaged file is a CheckpointError.

    Trusted files only: this is a full (``weights_only=False``) unpickle.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"legacy checkpoint file {path} is missing (every tensor- and "
                              "pipeline-parallel rank needs its file)")
    try:
        try:  # memory-mapped: tensors are read when used, not all at once
            loaded = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_pickle_module(), mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=False,  # pre-zip format
                                pickle_module=_pickle_module())
    except Exception as exc:  # noqa: BLE001 -- zip errors, EOFError, UnpicklingError...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"legacy checkpoint file {path} cannot be loaded "
                              f"({type(exc).__name__}: {detail}); it is truncated or corrupt, "
                              "copy it again from the source") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a Megatron "
                              "checkpoint dict")
    return loaded

