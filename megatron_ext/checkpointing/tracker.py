"""The ``latest_checkpointed_iteration.txt`` tracker and the iteration directories it names.

Why one module: dist checkpoints, Megatron-LLM's legacy per-rank layout and
the format detection all read the same file (Megatron-LM's name and format:
an iteration number, or ``release`` in legacy checkpoints); its parsing, its
errors and its atomic replacement live here once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal, Optional

from megatron_ext.errors import CheckpointError
from megatron_ext.io import write_text

TRACKER = "latest_checkpointed_iteration.txt"

Iteration = int | Literal["release"]


def tracker_text(root: str) -> Optional[str]:
    """The tracker's stripped contents, or None when ``root`` has no tracker file."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def read_tracker(root: str, allow_release: bool = False) -> Optional[Iteration]:
    """The iteration the tracker names (``'release'`` only when ``allow_release``), or
    None when there is no tracker; anything else is a :class:`CheckpointError`."""
    text = tracker_text(root)
    if text is None:
        return None
    if allow_release and text == "release":
        return "release"
    if not text.isdigit():
        tracker = os.path.join(root, TRACKER)
        if allow_release:
            raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}, expected an "
                                  "iteration number or 'release')")
        raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}, expected an iteration "
                              "number); fix it by hand or point --load at another directory")
    return int(text)


def latest_iteration(root: str) -> Optional[int]:
    """Iteration named by the tracker, or None when ``root`` holds no checkpoint."""
    return read_tracker(root)


def iteration_dirname(iteration: Iteration) -> str:
    """``iter_0000100`` (or ``release``): the directory of one saved iteration."""
    if iteration == "release":
        return "release"
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration must be a non-negative int or 'release', "
                              f"got {iteration!r}")
    return f"iter_{iteration:07d}"


def iteration_dir(root: str, iteration: Iteration) -> str:
    return os.path.join(root, iteration_dirname(iteration))


def write_tracker(root: str, iteration: Iteration) -> None:
    """Point the tracker at ``iteration`` (replaced atomically: never half a number)."""
    write_text(os.path.join(root, TRACKER), f"{iteration}\n")


@contextlib.contextmanager
def loading(directory: str) -> Iterator[None]:
    """Any failure of a checkpoint library's load inside, as a :class:`CheckpointError`
    naming the directory (torch's ``CheckpointException`` is a ``BaseException``, and its
    message runs to pages: its first line is kept)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {directory} cannot be loaded ({type(exc).__name__}: {detail}); it is "
            "damaged or was written for a different model shape (see its run_config.json)"
        ) from None
