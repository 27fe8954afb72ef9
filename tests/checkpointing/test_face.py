"""The checkpointing face re-exports lazily (PEP 562), and the moved configs keep their old homes.

Why: the face imports nothing heavy so that ``megatron_ext.checkpointing.options`` (the tools'
configs) loads without torch (tests/test_cli.py checks that in a child); here, in-process,
that every name it promises still arrives, from the room that defines it.
"""

from __future__ import annotations

import importlib

import pytest

import megatron_ext.checkpointing as face
from megatron_ext.errors import CheckpointError


def test_every_exported_name_is_its_rooms_object():
    assert face.CheckpointError is CheckpointError
    for name in face.__all__:
        if name == "CheckpointError":
            continue
        room = importlib.import_module(f"megatron_ext.checkpointing.{face._ROOMS[name]}")
        assert getattr(face, name) is getattr(room, name), name
        assert name in dir(face)
    from megatron_ext.checkpointing import TRACKER, load_checkpoint  # the usual spelling
    assert TRACKER == "latest_checkpointed_iteration.txt" and callable(load_checkpoint)


def test_other_names_are_missing_and_submodules_still_import():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        face.nothing
    with pytest.raises(ImportError, match="cannot import name 'nothing'"):
        exec("from megatron_ext.checkpointing import nothing", {})
    from megatron_ext.checkpointing import hf_tokenizer
    assert hf_tokenizer.__name__ == "megatron_ext.checkpointing.hf_tokenizer"


def test_moved_configs_are_importable_from_their_old_homes():
    from megatron_ext.checkpointing import hf_export, hf_import, options, reshard

    assert hf_import.ImportConfig is options.ImportConfig
    assert hf_export.ExportConfig is options.ExportConfig
    assert reshard.ReshardConfig is options.ReshardConfig
