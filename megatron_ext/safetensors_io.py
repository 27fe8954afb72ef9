"""Safetensors files read through a memory map, written in bounded shards.

Why not only the ``safetensors`` package: its readers copy each tensor into
process memory. Converting or resharding a model larger than RAM needs
tensors that are *views of the file* (the page cache holds them and the
kernel can drop them again), and a clear error naming the file when a shard
is truncated or its header is damaged. The format is simple (8-byte header
length, JSON header, raw little-endian data), so reading it is a few lines;
writing uses ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megatron_ext.errors import UserError
from megatron_ext.io import write_json

_DTYPES = {
    "F64": (torch.float64, np.float64), "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16), "BF16": (torch.bfloat16, np.uint16),
    "I64": (torch.int64, np.int64), "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16), "I8": (torch.int8, np.int8), "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}


_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


class SafetensorsError(UserError):
    """A safetensors file is missing, truncated or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][0]


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors a file holds, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated (only {size} bytes); re-download or "
                                       "re-create it")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > 100 * 2**20:
                raise SafetensorsError(f"{path}: truncated or not a safetensors file (header of "
                                       f"{length} bytes in a {size}-byte file)")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise SafetensorsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise SafetensorsError(f"{path}: damaged header (not valid JSON)") from None
    base = 8 + length
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, end = (base + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: damaged header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * torch.empty(0, dtype=_DTYPES[dtype][0]).element_size():
            raise SafetensorsError(f"{path}: damaged header (tensor {name!r} of shape {shape} "
                                   f"{dtype} spans {end - start} bytes)")
        if end > size:
            raise SafetensorsError(f"{path}: truncated ({size} bytes, tensor {name!r} ends at "
                                   f"byte {end}); re-download or re-create the file")
        out[name] = TensorInfo(dtype, shape, start, end)
    return out


def mmap_tensor(path: str, info: TensorInfo) -> torch.Tensor:
    """One tensor as a copy-on-write view of the file; unmapped when it is freed."""
    numel = int(np.prod(info.shape)) if info.shape else 1
    if numel == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    array = np.memmap(path, dtype=_DTYPES[info.dtype][1], mode="c", offset=info.start,
                      shape=(numel,))
    tensor = torch.from_numpy(array)
    if info.dtype == "BF16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.view(info.shape)


def read_weight_map(index_path: str, error=None) -> dict[str, str]:
    """``weight_map`` of a Hugging Face shard index, every file it names checked to exist.

    ``error`` is the exception class to raise (default :class:`SafetensorsError`).
    """
    error = error or SafetensorsError
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise error(f"{index_path}: unreadable index ({exc})") from None
    directory = os.path.dirname(index_path)
    for name in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(directory, name)):
            raise error(f"{os.path.join(directory, name)} is missing (named by the index); "
                        "the download is incomplete")
    return weight_map


class ShardedSafetensorsWriter:
    """Tensors added one by one, written as shards of at most ``max_shard_bytes``.

    Each tensor's bytes go to disk as it is added, so memory holds no shard: a
    converter's peak stays near one layer whatever the shard size. A safetensors
    header must precede the data and lists every tensor's offsets, so a shard's
    data is written after :data:`HEADER_ROOM` reserved bytes and closing it writes
    the header there, padded with spaces (which the format allows); a header that
    outgrows the room (hundreds of tensors in one shard) is written before a copy
    of the data instead. ``finish`` names the parts
    ``{stem}-00001-of-0000N.safetensors`` and writes the Hugging Face style
    index ``{stem}.safetensors.index.json`` (``weight_map``), all inside
    ``directory`` (the caller's staging directory).
    """

    def __init__(self, directory: str, stem: str = "model", max_shard_bytes: int = 2 * 2**30):
        self.directory, self.stem, self.max_shard_bytes = directory, stem, max_shard_bytes
        self._entries: dict[str, dict] = {}  # the current shard's header entries
        self._data = None  # the current shard's data file
        self._buffer_bytes = 0
        self._parts: list[list[str]] = []
        self.total_bytes = 0
        self._seen: set[str] = set()

    def _part(self, suffix: str = "") -> str:
        return os.path.join(self.directory, f".{self.stem}-part{len(self._parts):05d}{suffix}")

    HEADER_ROOM = 64 * 1024

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self._part(), "wb")
            self._data.seek(self.HEADER_ROOM)
        if nbytes:
            self._data.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._buffer_bytes, self._buffer_bytes + nbytes]}
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        import shutil

        if self._data is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries},
                            separators=(",", ":")).encode()
        part = self._part()
        if len(header) + 8 <= self.HEADER_ROOM:
            header += b" " * (self.HEADER_ROOM - 8 - len(header))
            self._data.seek(0)
            self._data.write(struct.pack("<Q", len(header)) + header)
            self._data.close()
        else:  # too many tensors for the room: the header, then the data copied behind it
            self._data.close()
            header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
            with open(part + ".full", "wb") as out, open(part, "rb") as source:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                source.seek(self.HEADER_ROOM)
                shutil.copyfileobj(source, out, 64 * 2**20)
            os.replace(part + ".full", part)
        self._parts.append(list(self._entries))
        self._entries, self._data, self._buffer_bytes = {}, None, 0

    def finish(self, metadata: dict | None = None) -> dict[str, str]:
        """Write the last shard and the index; returns the weight map."""
        self.flush()
        count = len(self._parts)
        weight_map = {}
        for index, names in enumerate(self._parts):
            final = (f"{self.stem}.safetensors" if count == 1
                     else f"{self.stem}-{index + 1:05d}-of-{count:05d}.safetensors")
            os.replace(os.path.join(self.directory, f".{self.stem}-part{index:05d}"),
                       os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes, **(metadata or {})},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(self.directory, f"{self.stem}.safetensors.index.json"), index)
        return weight_map


class SafetensorsIndex:
    """A directory's ``{stem}.safetensors.index.json`` (or single file), read lazily.

    Every file the index names is checked to exist and have an intact header
    up front, so a missing or truncated shard fails before anything is written.
    """

    def __init__(self, directory: str, stem: str = "model"):
        self.directory = directory
        index_path = os.path.join(directory, f"{stem}.safetensors.index.json")
        single = os.path.join(directory, f"{stem}.safetensors")
        if os.path.exists(index_path):
            weight_map = read_weight_map(index_path)
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = [f"{stem}.safetensors"], None
        else:
            raise SafetensorsError(f"{directory}: no {stem}.safetensors or "
                                   f"{stem}.safetensors.index.json")
        self.headers: dict[str, dict[str, TensorInfo]] = {}
        for name in files:
            self.headers[name] = read_header(os.path.join(directory, name))
        self.file_of: dict[str, str] = {}
        for name, header in self.headers.items():
            for tensor in header:
                self.file_of[tensor] = name
        if weight_map is not None:
            missing = [t for t, f in weight_map.items() if t not in self.headers[f]]
            if missing:
                raise SafetensorsError(f"{directory}: the index names tensors its shards lack "
                                       f"({', '.join(missing[:3])}...)")

    def names(self) -> Iterator[str]:
        return iter(self.file_of)

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.file_of[name]][name]

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy view of tensor ``name``: pages are read on first touch and leave
        this process's memory when the view is freed (nothing is cached here)."""
        file = self.file_of[name]
        return mmap_tensor(os.path.join(self.directory, file), self.headers[file][name])

    def get(self, name: str) -> torch.Tensor:
        return self.view(name).clone()
