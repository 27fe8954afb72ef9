"""megatron-core indexed datasets (MMIDIDX v1): chunked writing, atomic output sets.

Why not megatron-core's ``IndexedDatasetBuilder`` itself: importing
``megatron.core`` costs about 9 CPU-seconds (torch and all of megatron-core),
which a preprocessor's parent process would take from its workers, and the
builder writes one record per Python call with its index in Python lists.
:class:`ChunkedIndexedDatasetBuilder` writes the same bytes (the tests check
them against megatron-core's builder, and read them back with megatron-core's
``IndexedDataset``) from NumPy arrays, a chunk of records per call, with a
compact index, and imports no torch. :class:`AtomicDatasetOutputs` streams
``{prefix}-text``, ``{prefix}-role`` and ``{prefix}-meta.json`` into
temporary files (:class:`megatron_ext.io.StagedFiles`) and renames them only
once everything is complete.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Optional

import numpy as np

from megatron_ext.errors import DataError
from megatron_ext.io import StagedFiles, json_text, read_json

ROLE_DTYPE = np.uint8
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
#: megatron-core's ``DType`` codes
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}


def text_dtype_for(vocab_size: int) -> type:
    """Smallest dtype for every token id: megatron-core's ``DType.optimal_dtype`` rule."""
    return np.uint16 if vocab_size < 65500 else np.int32


class ChunkedIndexedDatasetBuilder:
    """Writes ``.bin``/``.idx`` exactly as megatron-core's builder does with
    ``add_item`` + ``end_document`` per record: one sequence and one document
    per record, so ``document_indices`` is ``0, 1, ..., n``.
    """

    def __init__(self, bin_path: str, dtype: type):
        self.dtype = np.dtype(dtype).type
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {dtype} has no megatron-core code")
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array("i")

    def add_records(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` records stored back to back in ``values``."""
        if int(lengths.sum()) != len(values):
            raise ValueError("lengths do not add up to the number of values")
        self.data_file.write(values.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.frombytes(lengths.astype(np.int32, copy=False).tobytes())

    def finalize(self, idx_path: str) -> None:
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        count = len(lengths)
        pointers = np.zeros(count, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as index:
            index.write(_INDEX_HEADER)
            index.write(struct.pack("<Q", _INDEX_VERSION))
            index.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            index.write(struct.pack("<Q", count))
            index.write(struct.pack("<Q", count + 1))
            index.write(lengths.tobytes(order="C"))
            index.write(pointers.tobytes(order="C"))
            index.write(np.arange(count + 1, dtype=np.int64).tobytes(order="C"))
            index.flush()
            os.fsync(index.fileno())


def sequence_lengths(prefix: str) -> np.ndarray:
    """Token counts of the records of ``{prefix}-text.idx`` (MMIDIDX v1), read without
    megatron-core (the launcher counts packed rows with them)."""
    path = dataset_paths(prefix)["text_idx"]
    try:
        with open(path, "rb") as index:
            header = index.read(len(_INDEX_HEADER) + 8 + 1 + 8 + 8)
            magic = header[:len(_INDEX_HEADER)]
            (version,) = struct.unpack("<Q", header[len(_INDEX_HEADER):len(_INDEX_HEADER) + 8])
            (count,) = struct.unpack("<Q", header[-16:-8])
            if magic != _INDEX_HEADER or version != _INDEX_VERSION:
                raise DataError(f"{path} is not a megatron-core index (MMIDIDX v1): "
                                "preprocess the data again")
            lengths = np.fromfile(index, dtype=np.int32, count=count)
    except (OSError, struct.error) as exc:
        raise DataError(f"cannot read {path} ({exc}): preprocess the data again") from None
    if len(lengths) != count:
        raise DataError(f"{path} is truncated: preprocess the data again")
    return lengths


def dataset_paths(prefix: str) -> dict[str, str]:
    """The files of one preprocessed dataset, in the order they are renamed."""
    return {
        "text_bin": f"{prefix}-text.bin",
        "role_bin": f"{prefix}-role.bin",
        "text_idx": f"{prefix}-text.idx",
        "role_idx": f"{prefix}-role.idx",
        "meta": f"{prefix}-meta.json",
    }


class AtomicDatasetOutputs:
    """Token and role streams plus meta.json, visible only when complete.

    Until :meth:`commit` every file has a ``.tmp.<pid>`` suffix; leaving the
    ``with`` block any other way (error, Ctrl-C, SIGTERM) deletes them. A
    kill -9 leaves only ``*.tmp.*`` files, which no reader mistakes for data
    and the next run for the same prefix removes. ``meta.json`` is renamed
    last and an older one is removed first, so a prefix whose meta.json
    exists is always a complete, matching set.
    """

    def __init__(self, prefix: str, text_dtype: type):
        self.files = StagedFiles(dataset_paths(prefix))
        self.paths = self.files.paths
        self.tmp = self.files.tmp
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
        self.files.write_text("meta", json_text(meta, ensure_ascii=False))
        # Unpublish an older set first (meta, then indexes): a crash between the
        # renames leaves .bin files without .idx, which no reader accepts, never a
        # new .bin beside an old .idx.
        self.files.publish(order=("text_bin", "role_bin", "text_idx", "role_idx", "meta"),
                           unpublish_first=("meta", "text_idx", "role_idx"))
        self.committed = True

    def __exit__(self, *exc_info) -> None:
        if self.committed:
            return
        for builder in (self.text, self.role):
            if not builder.data_file.closed:
                builder.data_file.close()
        self.files.discard()


def chat_settings_of_meta(meta: Optional[dict]) -> tuple[Optional[str], Optional[str]]:
    """(chat format name, prompt template) a ``-meta.json`` records: a dict since the
    format has a template, a bare name before; (None, None) when it records none."""
    value = (meta or {}).get("chat_format")
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and value.get("name"):
        return value["name"], value.get("prompt_template")
    return None, None


def read_meta(prefix: str) -> Optional[dict]:
    """``{prefix}-meta.json`` if present (Megatron-LLM datasets have none)."""
    path = dataset_paths(prefix)["meta"]
    if not os.path.exists(path):
        return None
    return read_json(path, DataError, "; preprocess the data again")
