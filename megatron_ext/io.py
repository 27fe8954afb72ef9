"""Atomic file writes, staged directories and publishing: the one implementation.

Why one module: every output a user may see half-written (datasets, meta
files, trackers, run configs, checkpoints, exported models, metrics,
predictions) must appear complete or not at all, and a writer killed with
``kill -9`` must not leave debris that lasts forever. Each rule lives here
once:

* a file is written beside its target as ``{target}.tmp.{pid}``, flushed,
  fsynced and renamed over the target (:func:`atomic_write`,
  :func:`write_json`, :func:`write_text`, :func:`write_jsonl`, and
  :class:`StagedFiles` for a set of streamed files published together);
* a directory is built as ``{target}.incomplete`` and renamed into place
  (:class:`StagedDirectory`, :func:`staged_directory`); an older target is
  first renamed aside to ``{target}.old.{pid}`` and deleted only once the
  new one is in place (:func:`publish`);
* temporaries carry their writer's process id, so the next writer of the same
  target removes those whose process is gone (:func:`remove_stale`) and
  leaves a live writer's alone (an old output a killed writer had set
  aside is put back if nothing replaced it).

:func:`read_json` is their reading counterpart (errors that name the file).

Floor 0: imports nothing of the project but its error types.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import IO, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from megatron_ext.errors import CheckpointError, UserError

TEMP_MARK = ".tmp."
OLD_MARK = ".old."
STAGING_SUFFIX = ".incomplete"


# ---------------------------------------------------------------- temporaries
def temp_path(path: str) -> str:
    """Where this process writes ``path`` before renaming it into place."""
    return f"{path}{TEMP_MARK}{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (so its temporaries are in use)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def remove_stale(path: str) -> list[str]:
    """Remove the temporaries of ``path`` left by writers that no longer run.

    Those are ``{path}.tmp.{pid}`` and ``{path}.old.{pid}`` (files or
    directories) whose process is gone (killed with -9, a crashed node). A
    live process's temporaries are kept: it may still be writing. An old
    output set aside by a writer killed before its replacement arrived is
    put back when ``path`` is missing: it is the only complete copy. Returns
    the removed paths.
    """
    target = os.path.abspath(path)
    directory, base = os.path.split(target)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for name in names:
        for mark in (OLD_MARK, TEMP_MARK):
            head = base + mark
            tail = name[len(head):]
            if name.startswith(head) and tail.isdigit() and not process_alive(int(tail)):
                stale = os.path.join(directory, name)
                if mark == OLD_MARK and not os.path.lexists(target):
                    os.replace(stale, target)
                else:
                    _remove(stale)
                    removed.append(stale)
    return removed


def fsync_directory(path: str) -> None:
    """Make renames in ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- single files
class AtomicFile:
    """A file written under :func:`temp_path` and renamed over ``path`` by :meth:`commit`.

    For writers that decide only at the end whether the file is kept (a
    rejects log is published with the run it explains, or dropped);
    :meth:`discard` (or leaving a ``with`` block without committing) removes
    the temporary.
    """

    def __init__(self, path: str, mode: str = "w", encoding: Optional[str] = "utf-8"):
        self.path = path
        remove_stale(path)
        self.tmp = temp_path(path)
        self.handle: IO = open(self.tmp, mode, encoding=None if "b" in mode else encoding)
        self.done = False

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        if not self.done:
            _remove(self.tmp)
        self.done = True

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.done:
            self.discard()


@contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """Yield a handle; on success the file replaces ``path``, on error it is removed.

    A reader sees the old file or the new one, never half of one.
    """
    with AtomicFile(path, mode, encoding) as target:
        yield target.handle
        target.commit()


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def json_text(value, ensure_ascii: bool = True) -> str:
    """The project's JSON file text: two-space indent, one trailing newline."""
    return json.dumps(value, indent=2, ensure_ascii=ensure_ascii) + "\n"


def write_json(path: str, value, ensure_ascii: bool = True) -> None:
    """``value`` as an indented JSON file, written atomically."""
    write_text(path, json_text(value, ensure_ascii))


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8 kept as is), written atomically; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: str, error: type[UserError] = UserError, advice: str = ""):
    """A JSON file's value; unreadable or invalid JSON is ``error`` naming the file
    (``advice`` appended: what to do about it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {path}: {exc}{advice}") from None


class StagedFiles:
    """Several files streamed under temporary names and published together.

    ``paths`` maps a key to each final path; :attr:`tmp` gives the key's
    temporary path to write. :meth:`publish` renames them in ``order`` after
    removing the ``unpublish_first`` targets (so a crash between two renames
    leaves an incomplete set that no reader accepts, never a mixed one).
    """

    def __init__(self, paths: Mapping[str, str]):
        self.paths = dict(paths)
        for path in self.paths.values():
            remove_stale(path)
        self.tmp = {key: temp_path(path) for key, path in self.paths.items()}
        self.published = False

    def write_text(self, key: str, text: str) -> None:
        """Write one member whole (flushed to disk before :meth:`publish` renames it)."""
        with open(self.tmp[key], "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def publish(self, order: Optional[Sequence[str]] = None,
                unpublish_first: Sequence[str] = ()) -> None:
        for key in unpublish_first:
            if os.path.exists(self.paths[key]):
                os.remove(self.paths[key])
        for key in order or list(self.paths):
            os.replace(self.tmp[key], self.paths[key])
        for directory in sorted({os.path.dirname(p) or "." for p in self.paths.values()}):
            fsync_directory(directory)
        self.published = True

    def discard(self) -> None:
        for path in self.tmp.values():
            _remove(path)


# ---------------------------------------------------------------- directories
def check_out_free(out: str, overwrite: bool) -> None:
    """Refuse an existing, non-empty output directory unless ``overwrite`` (checked early,
    before hours of work)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; choose a new --out or "
                              "pass --overwrite")


def publish(staging: str, out: str, on_published: Optional[Callable[[], None]] = None) -> None:
    """Replace ``out`` by the complete ``staging`` directory (or file).

    The old ``out`` is renamed aside to ``{out}.old.{pid}`` first and deleted
    only once the new one is in place and ``on_published`` (e.g. writing a
    tracker that names it) has run, so a failure leaves the old or the new
    one complete; a writer killed between the two renames leaves the old one
    aside, which the next writer of ``out`` removes.
    """
    remove_stale(out)
    old = None
    if os.path.lexists(out):
        old = f"{out}{OLD_MARK}{os.getpid()}"
        _remove(old)
        os.replace(out, old)
    os.replace(staging, out)
    if on_published is not None:
        on_published()
    if old is not None:
        _remove(old)


class StagedDirectory:
    """A directory built at ``{out}.incomplete`` and published to ``out`` when complete.

    Creating it refuses a non-empty ``out`` unless ``overwrite`` and clears a
    staging directory an earlier (killed) writer left. As a context manager:
    an exception removes the staging directory; :meth:`publish` is explicit.
    """

    def __init__(self, out: str, overwrite: bool = False):
        self.out = os.path.abspath(out)
        remove_stale(self.out)  # first: it may put back an output a killed writer set aside
        check_out_free(self.out, overwrite)
        self.path = self.out + STAGING_SUFFIX
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        self.published = False

    def publish(self, on_published: Optional[Callable[[], None]] = None) -> str:
        self.published = True  # complete from here on: never deleted, even if publishing fails
        publish(self.path, self.out, on_published)
        return self.out

    def discard(self) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedDirectory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


@contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield ``{out}.incomplete``; on success it replaces ``out``, on error it is removed."""
    with StagedDirectory(out, overwrite) as staged:
        yield staged.path
        staged.publish()


@contextmanager
def temporary_directory(near: str) -> Iterator[str]:
    """A scratch directory ``{near}.tmp.{pid}``, always removed afterwards (its contents
    are moved out by the caller or dropped)."""
    remove_stale(near)
    path = temp_path(near)
    _remove(path)
    os.makedirs(path)
    try:
        yield path
    finally:
        _remove(path)
