"""Pickled checkpoint files read without running code from them.

Why: a pickle names the classes and functions that rebuild its objects, and a
plain ``pickle.load`` / ``torch.load(weights_only=False)`` imports and calls
whatever it names (``os.system`` included). A checkpoint a user downloads must
not be able to do that, and docstrings saying "trusted files only" protect no
one. Every pickled file the project reads goes through :func:`load_pickled`:

* Megatron-LLM's legacy rank files (``legacy/unpickling.py``: names that are
  not allowed become inert stand-ins, e.g. ``megatron.model.enums`` members);
* ``common.pt`` of the unsharded file set and of ``dist_checkpointing``
  directories, the ``.metadata`` of those directories and their pickled
  objects (RNG state): :func:`check_dist_checkpoint` reads them restricted
  before megatron-core reads them itself (see its docstring).

The allowed names are what ``torch.load(weights_only=True)`` allows (tensors,
storages, dtypes, ``OrderedDict``...), the safe globals registered with torch
(megatron-core registers ``argparse.Namespace``, numpy arrays...), plain
dataclasses and enums of ``torch.distributed.checkpoint``'s metadata, and the
few names below. Anything else is never imported: it becomes a stand-in when
the caller gives a factory, otherwise a :class:`CheckpointError` naming the
file and the refused name.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import pickle
import types
from typing import IO, Any, Callable, Iterable, Optional, Union

import torch

from megatron_ext.errors import CheckpointError

StandIn = Callable[[str, str], type]  # (module, name) -> an inert class

# allowed beyond torch's weights-only set, as pickles spell them (several numpy versions)
_EXTRA = frozenset({
    "argparse.Namespace", "types.SimpleNamespace", "builtins.frozenset", "builtins.slice",
    "builtins.range", "collections.defaultdict", "collections.deque", "torch.device",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype", "pathlib.PosixPath", "pathlib.PurePosixPath",
})
# modules whose dataclasses and enums are allowed: dist checkpoints' ``.metadata``
_DATA_MODULES = frozenset({
    "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
})
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class RefusedFileError(CheckpointError):
    """A pickled file names something that is not loaded from checkpoint files."""


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


def _torch_allowed() -> dict[str, Any]:
    """torch's weights-only names and the safe globals registered with torch, by name."""
    allowed: dict[str, Any] = {}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without it: the explicit names below
        import torch._utils as utils

        allowed.update({f"torch._utils.{n}": getattr(utils, n) for n in (
            "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")})
        allowed["collections.OrderedDict"] = __import__("collections").OrderedDict
        allowed["torch.Size"] = torch.Size
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        name = name or f"{obj.__module__}.{getattr(obj, '__qualname__', obj.__name__)}"
        allowed[name] = obj
    return allowed


def allowed_global(module: str, name: str, table: Optional[dict] = None) -> Optional[Any]:
    """The object a pickle may name as ``module.name``, or None when it is not allowed.

    Only allowed modules are imported: a refused name runs nothing, not even an import.
    ``table``: :func:`_torch_allowed`'s, when the caller keeps it.
    """
    qualified = f"{module}.{name}"
    found = (table if table is not None else _torch_allowed()).get(qualified)
    if found is not None:
        return found
    if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
        return getattr(torch, name)
    if qualified in _EXTRA or module in _DATA_MODULES or module == "numpy.dtypes":
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
        if qualified in _EXTRA:
            return obj
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
                                      or (module == "numpy.dtypes" and name.endswith("DType"))):
            return obj
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowed names; the others become ``stand_in(module, name)`` or refused."""

    stand_in: Optional[StandIn] = None
    _table: Optional[dict] = None

    def find_class(self, module: str, name: str) -> Any:
        if self._table is None:
            self._table = _torch_allowed()
        obj = allowed_global(module, name, self._table)
        if obj is not None:
            return obj
        if self.stand_in is not None:
            return self.stand_in(module, name)
        raise RefusedGlobal(module, name)


def _pickle_module(stand_in: Optional[StandIn]) -> types.ModuleType:
    """The ``pickle`` module as ``torch.load(pickle_module=...)`` uses it, restricted."""
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"stand_in": staticmethod(stand_in)}
                     if stand_in is not None else {})
    module = types.ModuleType("megatron_ext_restricted_pickle")
    module.__dict__.update({name: getattr(pickle, name) for name in dir(pickle)
                            if not name.startswith("__")})
    module.Unpickler = unpickler
    module.load = lambda file, **kw: unpickler(file, **kw).load()
    return module


def refused_message(source: str, qualified: str) -> str:
    return (f"{source} is refused: it names {qualified}, which is not a tensor, a plain "
            "container or a known checkpoint type, and loading it could run code stored in "
            "the file; use a checkpoint written by this project, Megatron-LLM or "
            "megatron-core, or convert it with the tool that wrote it")


def load_pickled(source: Union[str, IO[bytes]], *, torch_file: bool = True,
                 stand_in: Optional[StandIn] = None, mmap: bool = False,
                 name: Optional[str] = None) -> Any:
    """Read a ``torch.save`` file (or, ``torch_file=False``, a plain pickle) restricted.

    ``source``: a path or a binary file; ``name``: how messages call it (default the
    path). ``mmap``: memory-map a zip-format torch file (tensors read when used; older
    formats are read whole). A name that is not allowed becomes ``stand_in(module,
    name)`` or, without ``stand_in``, a :class:`RefusedFileError` (a CheckpointError
    naming the file and the name). Other failures (a missing or truncated file...)
    propagate for the caller to word.
    """
    label = name or (source if isinstance(source, str) else "a pickled object")
    try:
        if not torch_file:
            if isinstance(source, str):
                with open(source, "rb") as handle:
                    return _pickle_module(stand_in).load(handle)
            return _pickle_module(stand_in).load(source)
        kwargs = dict(map_location="cpu", weights_only=False,
                      pickle_module=_pickle_module(stand_in))
        if mmap and isinstance(source, str):
            try:
                return torch.load(source, mmap=True, **kwargs)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
        return torch.load(source, **kwargs)
    except RefusedGlobal as exc:
        raise RefusedFileError(refused_message(label, exc.qualified)) from None


# ---------------------------------------------------------------- dist_checkpointing directories
DIST_METADATA = ".metadata"  # torch.distributed.checkpoint's
DIST_COMMON = "common.pt"  # megatron-core's COMMON_STATE_FNAME


def _unreadable(path: str, exc: BaseException) -> CheckpointError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: "
                           f"{detail}); it is damaged or incomplete")


def read_dist_metadata(directory: str):
    """The ``.metadata`` of a ``dist_checkpointing`` directory, read restricted."""
    path = os.path.join(directory, DIST_METADATA)
    try:
        return load_pickled(path, torch_file=False)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- EOFError, UnpicklingError...
        raise _unreadable(path, exc) from None


def read_dist_common(directory: str) -> dict:
    """The common (non-sharded) state of a ``dist_checkpointing`` directory, read restricted.

    What ``dist_checkpointing.load_common_state_dict`` returns for our checkpoints.
    """
    path = os.path.join(directory, DIST_COMMON)
    try:
        return load_pickled(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None


def safe_filesystem_reader(directory: str, metadata: Any = None):
    """A DCP ``FileSystemReader`` that never unpickles ``.metadata`` unrestricted: it
    returns the restricted read (:func:`read_dist_metadata`), or ``metadata`` where the
    caller has read it already.

    Why pass it: a checkpoint read in parts (:func:`unsharded.iter_dist_checkpoint`: a
    layer at a time) is one ``dcp.load`` per part, and torch's reader reads and unpickles
    the file for each; a model of 30 layers read it 62 times (1.2 s of a 9 s export).
    The restricted read gives the objects torch's would (every class it meets is allowed
    or the read is refused), so it is also what torch then uses."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            nonlocal metadata
            if kwargs.get("rank") is not None:  # a rank's own metadata file: checked, then torch's
                read_dist_metadata(str(self.path))
                return super().read_metadata(*args, **kwargs)
            if metadata is None:
                metadata = read_dist_metadata(str(self.path))
            if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedFileSystemReader(directory)


def check_dist_checkpoint(directory: str, object_keys: Iterable[str] = ()) -> dict:
    """Read restricted what megatron-core then unpickles unrestricted; returns the common state.

    Why: ``dist_checkpointing.load`` reads ``.metadata`` with ``pickle.load`` (torch's
    ``FileSystemReader``) and the pickled objects (``ShardedObject``: RNG state...)
    with ``torch.load(weights_only=False)`` (torch's load planner), and ``common.pt``
    with ``torch.load``'s default (restricted from torch 2.6). Megatron-core gives no
    hook to replace those readers, so each is read here first, restricted: ``.metadata``,
    ``common.pt`` and every object stored under ``object_keys`` (the ``ShardedObject``
    keys the load will ask for). A refused name is a :class:`CheckpointError` before
    megatron-core reads anything. What is left: the files are read twice, and a file
    replaced between the check and megatron-core's read is not checked (only someone
    who can write the checkpoint while it loads can do that).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dist_metadata(directory)
    common = read_dist_common(directory)
    prefixes = tuple(f"{key}/" for key in object_keys)
    objects = [fqn for fqn, item in metadata.state_dict_metadata.items()
               if isinstance(item, BytesStorageMetadata) and fqn.startswith(prefixes)]
    if objects:
        _check_objects(directory, objects, metadata)
    return common


def _check_objects(directory: str, fqns: list[str], metadata: Any = None) -> None:
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class CheckingPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            load_pickled(value, name=f"{directory}: object {read_item.dest_index.fqn}")

    try:
        dcp_load({fqn: io.BytesIO() for fqn in fqns}, storage_reader=safe_filesystem_reader(
            directory, metadata), planner=CheckingPlanner(), no_dist=True)
    except CheckpointError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        cause = _checkpoint_error_in(exc)
        if cause is not None:
            raise cause from None
        raise _unreadable(directory, exc) from None


def _checkpoint_error_in(exc: BaseException) -> Optional[CheckpointError]:
    """A CheckpointError that torch's checkpoint loader wrapped (per rank), if any."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        if isinstance(failure, tuple):  # (exception, stack summary)
            failure = failure[0]
        if isinstance(failure, CheckpointError):
            return failure
        inner = getattr(failure, "exception", None) or getattr(failure, "__cause__", None)
        if isinstance(inner, CheckpointError):
            return inner
    return None

