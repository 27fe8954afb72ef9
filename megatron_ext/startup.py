"""A process's heavy imports without the garbage collector's full collections.

Why: importing torch, megatron-core and transformers creates about half a million objects
that live as long as the process. CPython's collector, counting allocations, runs a full
collection every time the heap has grown by a quarter, and each one walks every object
imported so far: a fifth of a process's start-up (measured on the 2-core machine: 4.8 s
of CPU to import what a trainer rank needs, 3.9 s without those collections). Every rank
of every launch, every tool and every launcher step pays it.

So an entry point imports its heavy modules inside :func:`heavy_imports`: meanwhile only
the young generations are collected (cheap: they look at new objects only, and reclaim
nearly all of what importing throws away: 0.2 MB was left for the full collection, against
7 MB with the collector off). At the end, what exists is frozen (:func:`gc.freeze`): the
full collections of the rest of the process's life skip the imported modules instead of
walking them again.

Only the first block of a process freezes. A process that has settled (the test session
after collecting its tests, a test worker after its imports) or a block inside another
block imports plainly: freezing later would keep the cycles of work done so far, which a
collection would have freed. Imports only: work inside the block would leave its cyclic
garbage to the freeze.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from typing import Iterator

NO_FULL_COLLECTION = 1 << 30
"""The third threshold while importing: the number of young collections before a full one
is considered, never reached."""

_settled = False
_paused: tuple[int, int, int] | None = None  # the thresholds to restore


def pause() -> None:
    """From now until :func:`settle`: young collections only (nothing if already settled or
    paused, or if the collector is off)."""
    global _paused
    if _settled or _paused is not None or not gc.isenabled():
        return
    _paused = gc.get_threshold()
    gc.set_threshold(_paused[0], _paused[1], NO_FULL_COLLECTION)


def settle() -> None:
    """Imports done: the collector's thresholds back, and what exists frozen (once a
    process)."""
    global _settled, _paused
    if _paused is not None:
        gc.set_threshold(*_paused)
        _paused = None
    if not _settled:
        _settled = True
        gc.freeze()


def settled() -> bool:
    return _settled


@contextlib.contextmanager
def heavy_imports(*modules: str) -> Iterator[None]:
    """Import ``modules`` (say ``"torch"``, which the block's own imports use later), then
    what the block imports: the first such block of a process pauses full collections and
    settles at its end (see the module's docstring); any other imports plainly."""
    first = not _settled and _paused is None
    if first:
        pause()
    try:
        for module in modules:
            importlib.import_module(module)
        yield
    finally:
        if first:
            settle()
