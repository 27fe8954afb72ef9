"""Output directories of the tools: replaced only when complete, never lost."""

from __future__ import annotations

import pytest

from megatron_ext.checkpointing import CheckpointError
from megatron_ext.io import staged_directory


def test_existing_output_needs_overwrite_and_survives_a_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="--overwrite"):
        with staged_directory(str(out)):
            pass
    with pytest.raises(RuntimeError):
        with staged_directory(str(out), overwrite=True) as staging:
            (tmp_path / "out.incomplete" / "half.txt").write_text("half")
            assert staging.endswith("out.incomplete")
            raise RuntimeError("disk full")
    assert (out / "old.txt").read_text() == "old"
    assert not (tmp_path / "out.incomplete").exists()
    with staged_directory(str(out), overwrite=True) as staging:
        (tmp_path / "out.incomplete" / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
