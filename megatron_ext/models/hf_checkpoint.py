"""Hugging Face model directories as tensor sources, read one tensor at a time.

Why lazily: a 70B model must convert on a machine with less RAM than the
model. Safetensors shards are memory-mapped (pages are read when a tensor is
used and can be dropped again); ``.bin`` shards are opened with
``torch.load(mmap=True)``. Everything a directory needs (config, every shard
the index names, intact headers) is checked before any output is written.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

import torch

from megatron_ext.safetensors_io import SafetensorsError, SafetensorsIndex, read_weight_map
# the readers' error lives with config.json's reader, which needs no torch
from megatron_ext.models.import_sources import HFCheckpointError


class WeightSource(Protocol):
    """Tensors under their Hugging Face names, read one at a time: :class:`HFWeights`,
    :class:`~megatron_ext.models.gguf_checkpoint.GGUFWeights`."""

    format: str  # safetensors | bin | gguf

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def require(self, names: list[str]) -> None:
        """Raise :class:`HFCheckpointError` naming what is missing."""


class HFWeights:
    """The tensors of a model directory (safetensors preferred, else ``.bin``)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        has = lambda name: os.path.exists(os.path.join(model_dir, name))  # noqa: E731
        self._bin_files: dict[str, str] = {}
        self._bin_loaded: dict[str, dict] = {}
        self._st: Optional[SafetensorsIndex] = None
        try:
            if has("model.safetensors") or has("model.safetensors.index.json"):
                self._st = SafetensorsIndex(model_dir, "model")
                self.format = "safetensors"
            elif has("pytorch_model.bin.index.json") or has("pytorch_model.bin"):
                self._index_bins()
                self.format = "bin"
            else:
                raise HFCheckpointError(
                    f"{model_dir} has no weights (model.safetensors[.index.json] or "
                    "pytorch_model.bin[.index.json])")
        except SafetensorsError as exc:
            raise HFCheckpointError(str(exc)) from None

    def _index_bins(self) -> None:
        index = os.path.join(self.model_dir, "pytorch_model.bin.index.json")
        if os.path.exists(index):
            self._bin_files.update(read_weight_map(index, HFCheckpointError))
        else:
            for name in self._load_bin("pytorch_model.bin"):
                self._bin_files[name] = "pytorch_model.bin"

    def _load_bin(self, file: str) -> dict:
        if file not in self._bin_loaded:
            path = os.path.join(self.model_dir, file)
            try:
                self._bin_loaded[file] = torch.load(path, map_location="cpu", mmap=True,
                                                    weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means a damaged file
                raise HFCheckpointError(f"{path} is damaged or truncated ({type(exc).__name__}: "
                                        f"{str(exc)[:160]}); re-download it") from None
        return self._bin_loaded[file]

    def names(self) -> list[str]:
        return list(self._st.names()) if self._st else list(self._bin_files)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._st:
            return self._st.info(name).shape
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (a file view for safetensors: copy before writing to it)."""
        if self._st:
            return self._st.view(name)
        return self._load_bin(self._bin_files[name])[name]

    def require(self, names: list[str]) -> None:
        have = set(self.names())
        missing = [n for n in names if n not in have]
        if missing:
            raise HFCheckpointError(
                f"{self.model_dir}: {len(missing)} expected tensors are missing "
                f"({', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}); the checkpoint "
                "is incomplete or not a Llama/Mistral model")
