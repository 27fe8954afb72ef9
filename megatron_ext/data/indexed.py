"""megatron-core indexed datasets: chunked writing and atomic output sets.

Why: megatron-core's ``IndexedDatasetBuilder`` writes one item per Python
call and keeps its index in Python lists (about 40 bytes a record).
:class:`ChunkedIndexedDatasetBuilder` keeps the same file format and the
same class (so megatron-core's ``IndexedDataset`` and Megatron-LLM read the
result) but appends a whole chunk of records per call and stores its index
in compact arrays. :class:`AtomicDatasetOutputs` writes ``{prefix}-text``,
``{prefix}-role`` and ``{prefix}-meta.json`` under temporary names and
renames them only once everything is complete.
"""

from __future__ import annotations

import json
import os
from array import array
from typing import Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    _IndexWriter,
    get_bin_path,
    get_idx_path,
)

ROLE_DTYPE = np.uint8


def text_dtype_for(vocab_size: int) -> type:
    """Smallest dtype that holds every token id (megatron-core's own rule)."""
    return DType.optimal_dtype(vocab_size)


class _VectorIndexWriter(_IndexWriter):
    """``_IndexWriter`` with pointers computed by NumPy instead of a Python loop."""

    def _sequence_pointers(self, sequence_lengths):
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
        return pointers


class ChunkedIndexedDatasetBuilder(IndexedDatasetBuilder):
    """An ``IndexedDatasetBuilder`` that takes many records per call.

    Each record is one sequence and one document, so ``document_indices`` is
    ``0, 1, ..., n`` as megatron-core's reader requires.
    """

    def __init__(self, bin_path: str, dtype: type):
        super().__init__(bin_path, dtype=dtype)
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])

    def add_records(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` records stored back to back in ``values``."""
        if int(lengths.sum()) != len(values):
            raise ValueError("lengths do not add up to the number of values")
        self.data_file.write(values.astype(self.dtype, copy=False).tobytes(order="C"))
        first = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(lengths.astype(np.int32, copy=False).tobytes())
        self.document_indices.frombytes(
            np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64).tobytes()
        )

    def finalize(self, idx_path: str) -> None:
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        self.data_file.close()
        with _VectorIndexWriter(idx_path, self.dtype) as writer:
            writer.write(
                np.frombuffer(self.sequence_lengths, dtype=np.int32),
                None,
                np.frombuffer(self.document_indices, dtype=np.int64),
            )
            writer.idx_writer.flush()
            os.fsync(writer.idx_writer.fileno())


def dataset_paths(prefix: str) -> dict[str, str]:
    """The files of one preprocessed dataset, in the order they are renamed."""
    return {
        "text_bin": get_bin_path(f"{prefix}-text"),
        "role_bin": get_bin_path(f"{prefix}-role"),
        "text_idx": get_idx_path(f"{prefix}-text"),
        "role_idx": get_idx_path(f"{prefix}-role"),
        "meta": f"{prefix}-meta.json",
    }


class AtomicDatasetOutputs:
    """Token and role streams plus meta.json, visible only when complete.

    Until :meth:`commit` every file has a ``.tmp.<pid>`` suffix; leaving the
    ``with`` block any other way (error, Ctrl-C, SIGTERM) deletes them. A
    kill -9 leaves only ``*.tmp.*`` files, which no reader mistakes for data.
    ``meta.json`` is renamed last and an older one is removed first, so a
    prefix whose meta.json exists is always a complete, matching set.
    """

    def __init__(self, prefix: str, text_dtype: type):
        self.paths = dataset_paths(prefix)
        suffix = f".tmp.{os.getpid()}"
        self.tmp = {key: path + suffix for key, path in self.paths.items()}
        self.text = ChunkedIndexedDatasetBuilder(self.tmp["text_bin"], text_dtype)
        self.role = ChunkedIndexedDatasetBuilder(self.tmp["role_bin"], ROLE_DTYPE)
        self.committed = False

    def __enter__(self) -> "AtomicDatasetOutputs":
        return self

    def add(self, tokens: np.ndarray, roles: np.ndarray, lengths: np.ndarray) -> None:
        self.text.add_records(tokens, lengths)
        self.role.add_records(roles, lengths)

    def commit(self, meta: dict) -> None:
        self.text.finalize(self.tmp["text_idx"])
        self.role.finalize(self.tmp["role_idx"])
        write_json_atomic(self.tmp["meta"], meta, already_tmp=True)
        if os.path.exists(self.paths["meta"]):
            os.remove(self.paths["meta"])
        for key in ("text_bin", "role_bin", "text_idx", "role_idx", "meta"):
            os.replace(self.tmp[key], self.paths[key])
        _fsync_dir(os.path.dirname(self.paths["meta"]) or ".")
        self.committed = True

    def __exit__(self, *exc_info) -> None:
        if self.committed:
            return
        for builder in (self.text, self.role):
            if not builder.data_file.closed:
                builder.data_file.close()
        for path in self.tmp.values():
            if os.path.exists(path):
                os.remove(path)


def write_json_atomic(path: str, payload: dict, already_tmp: bool = False) -> None:
    """Write JSON so a reader sees the old file or the new one, never half."""
    target = path if already_tmp else f"{path}.tmp.{os.getpid()}"
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    if not already_tmp:
        os.replace(target, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_meta(prefix: str) -> Optional[dict]:
    """``{prefix}-meta.json`` if present (Megatron-LLM datasets have none)."""
    path = dataset_paths(prefix)["meta"]
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
