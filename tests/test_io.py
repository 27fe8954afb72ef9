"""Atomic writes, staged directories and the cleanup of temporaries a killed writer left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from megatron_ext.errors import CheckpointError
from megatron_ext.io import (
    AtomicFile,
    StagedDirectory,
    StagedFiles,
    atomic_write,
    publish,
    remove_stale,
    staged_directory,
    temp_path,
    write_json,
    write_jsonl,
)
from tests.conftest import REPO

# A writer that leaves a temporary of each kind the project writes, then waits to be killed.
_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from megatron_ext.io import AtomicFile, StagedFiles, temp_path
    target, prefix, out = sys.argv[2:5]
    AtomicFile(target).handle.write("half")
    files = StagedFiles({"bin": prefix + "-text.bin", "meta": prefix + "-meta.json"})
    open(files.tmp["bin"], "wb").write(b"partial")
    os.makedirs(temp_path(out))
    os.makedirs(out + ".old." + str(os.getpid()))
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def killed_writer_leftovers(tmp_path):
    """Paths a writer killed with -9 left behind, and its (dead) process id."""
    target = str(tmp_path / "latest_checkpointed_iteration.txt")
    prefix = str(tmp_path / "data")
    out = str(tmp_path / "model")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(REPO), target, prefix, out],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    pid = child.pid
    left = {"target": f"{target}.tmp.{pid}", "bin": f"{prefix}-text.bin.tmp.{pid}",
            "staged": f"{out}.tmp.{pid}", "old": f"{out}.old.{pid}"}
    assert all(os.path.exists(path) for path in left.values()), left
    return target, prefix, out, left


def test_next_writer_removes_a_killed_writers_temporaries(killed_writer_leftovers):
    target, prefix, out, left = killed_writer_leftovers
    write_json(target, {"iteration": 3})
    assert not os.path.exists(left["target"])
    files = StagedFiles({"bin": prefix + "-text.bin", "meta": prefix + "-meta.json"})
    assert not os.path.exists(left["bin"])
    files.discard()
    with staged_directory(out) as staging:
        open(os.path.join(staging, "weights"), "w").write("w")
    assert not os.path.exists(left["staged"]) and not os.path.exists(left["old"])
    assert sorted(os.listdir(os.path.dirname(out))) == [
        "latest_checkpointed_iteration.txt", "model"]


def test_an_old_output_set_aside_by_a_killed_writer_is_put_back(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    aside = tmp_path / f"model.old.{dead.pid}"  # killed between its two renames
    aside.mkdir()
    (aside / "weights").write_text("complete")
    with pytest.raises(CheckpointError, match="--overwrite"):
        StagedDirectory(str(out))
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (out / "weights").read_text() == "complete"


def test_a_live_writers_temporaries_are_kept(tmp_path):
    target = str(tmp_path / "out.json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        theirs = f"{target}.tmp.{live.pid}"
        open(theirs, "w").write("still writing")
        write_json(target, [1])
        assert remove_stale(target) == []
        assert open(theirs).read() == "still writing"
    finally:
        live.kill()
        live.wait(timeout=60)
    assert remove_stale(target) == [theirs]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as handle:
            handle.write("new but")
            assert path.read_text() == "old"  # nothing visible before the rename
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
    with atomic_write(str(path)) as handle:
        handle.write("new")
    assert path.read_text() == "new"
    write_jsonl(str(tmp_path / "sub" / "rows.jsonl"), [{"a": "é"}, {"b": 2}])
    assert (tmp_path / "sub" / "rows.jsonl").read_text(encoding="utf-8") == \
        '{"a": "é"}\n{"b": 2}\n'
    write_json(str(path), {"k": "é"})
    assert path.read_text() == '{\n  "k": "\\u00e9"\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "sub"]


def test_atomic_file_is_published_or_discarded(tmp_path):
    kept, dropped = str(tmp_path / "kept"), str(tmp_path / "dropped")
    with AtomicFile(kept) as a, AtomicFile(dropped) as b:
        assert a.tmp == temp_path(kept)
        a.handle.write("x")
        b.handle.write("y")
        a.commit()
    assert os.listdir(tmp_path) == ["kept"]


def test_staged_files_publish_together_and_unpublish_the_old_set_first(tmp_path):
    paths = {"bin": str(tmp_path / "d.bin"), "idx": str(tmp_path / "d.idx")}
    (tmp_path / "d.idx").write_text("old index")
    files = StagedFiles(paths)
    open(files.tmp["bin"], "w").write("data")
    files.write_text("idx", "index")
    assert (tmp_path / "d.idx").read_text() == "old index"
    files.publish(order=("bin", "idx"), unpublish_first=("idx",))
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert (tmp_path / "d.idx").read_text() == "index"


def test_staged_directory_publishes_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    with staged_directory(str(out)) as staging:
        assert staging == str(out) + ".incomplete"
        (tmp_path / "out.incomplete" / "a").write_text("1")
    assert sorted(os.listdir(out)) == ["a"]
    with pytest.raises(CheckpointError, match="--overwrite"):
        StagedDirectory(str(out))
    calls = []
    staged = StagedDirectory(str(out), overwrite=True)
    (tmp_path / "out.incomplete" / "b").write_text("2")
    staged.publish(on_published=lambda: calls.append(sorted(os.listdir(tmp_path))))
    # the old output is still aside (not yet deleted) while on_published runs
    assert calls == [["out", f"out.old.{os.getpid()}"]]
    assert sorted(os.listdir(out)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "file.new").write_text("n")
    publish(str(tmp_path / "file.new"), str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "n"
