"""Packing a whole epoch's records into rows of ``seq_length`` positions (``--pack_sequences``).

Why the whole epoch: packing only the records of one micro-batch leaves every row as
full as chance makes it (5-35% padding on short-record SFT data); best-fit decreasing
over the epoch fills rows to a few tokens. A packed row is then one sample of the global
batch (as in NeMo's packed SFT datasets and TRL), and what the trainer checkpoints stays
the number of samples (rows) consumed: the packing of an epoch is a pure function of the
row capacity and the epoch's record sizes in the epoch's (seeded) order, so every rank,
a resumed run and a run at another data-parallel size compute the same rows.

:func:`best_fit_decreasing` is vectorised per distinct size (at most ``capacity`` rounds
of NumPy work, not one Python step per record): an epoch of a million records packs in
about a second. :class:`PackingCache` keeps each epoch's rows beside the dataset index so
that relaunches and every rank of a node read them instead.

Floor 2: NumPy only (the launcher counts rows with it, without torch).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import numpy as np

from megatron_ext.io import atomic_write

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the algorithm and of the cache files: a change of either changes the key."""


def packed_sizes(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Positions each record takes in a row: ``n`` tokens give ``n - 1`` (input, label)
    pairs, cut at ``capacity``; at least 1, so that a one-token record still has a row."""
    return np.clip(np.asarray(lengths, dtype=np.int64) - 1, 1, capacity)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Row number of each item: best-fit decreasing into rows of ``capacity``.

    Items go longest first (ties in index order), each into the open row whose free room
    is the smallest that holds it, or a new row (rows numbered as they are opened).
    Deterministic, and the rows' fill depends on the multiset of sizes only (the order
    decides which of equal items goes where): every epoch of one dataset has as many rows.

    Vectorised per distinct size ``s``: best fit puts the next item into the row that has
    just taken one as long as its room stays ``>= s`` (that room is then the smallest), so
    a row of room ``c`` takes ``c // s`` items in one step, rooms are visited in increasing
    order, and the rest opens rows of ``capacity // s`` items each.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"item sizes must lie in 1..{capacity}")
    order = np.argsort(-sizes, kind="stable")
    row_of = np.empty(len(sizes), dtype=np.int64)
    # rooms[c]: arrays of the row numbers whose free room is c (in the order they got it)
    rooms: list[list[np.ndarray]] = [[] for _ in range(capacity + 1)]
    count = np.zeros(capacity + 1, dtype=np.int64)
    opened = 0
    values, starts = np.unique(-sizes[order], return_index=True)
    bounds = list(starts) + [len(order)]
    for value, first, stop in zip(values, bounds[:-1], bounds[1:]):
        size, left = int(-value), int(stop - first)
        takers, takes = [], []
        for room in np.flatnonzero(count[size:]) + size:  # rooms that hold one, smallest first
            rows = np.concatenate(rooms[room])
            each = int(room // size)
            full = min(len(rows), left // each)  # rows taking ``each`` items
            part = left - full * each if full < len(rows) else 0  # one row taking fewer
            used = full + (part > 0)
            takers.append(rows[:used])
            takes.append(np.r_[np.full(full, each), [part] if part else []].astype(np.int64))
            rooms[room] = [rows[used:]] if used < len(rows) else []
            count[room] -= used
            if full:
                rooms[room - each * size].append(rows[:full])
                count[room - each * size] += full
            if part:
                rooms[room - part * size].append(rows[full:used])
                count[room - part * size] += 1
            left -= full * each + part
            if not left:
                break
        if left:  # new rows: ``each`` items apiece, the last one the rest
            each = capacity // size
            new = -(-left // each)
            rows = np.arange(opened, opened + new)
            opened += new
            fill = np.full(new, each, dtype=np.int64)
            fill[-1] = left - each * (new - 1)
            takers.append(rows)
            takes.append(fill)
            for room in np.unique(capacity - fill * size):
                chosen = rows[capacity - fill * size == room]
                rooms[room].append(chosen)
                count[room] += len(chosen)
        row_of[order[first:stop]] = np.repeat(np.concatenate(takers), np.concatenate(takes))
    return row_of


def pack_epoch(sizes: np.ndarray, capacity: int, seed: Optional[int] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's rows: ``(items, offsets)``, row ``r`` holding the items
    ``items[offsets[r]:offsets[r + 1]]`` (indexes into ``sizes``, in index order inside a
    row). Rows come in an order shuffled with ``seed`` (best-fit opens rows longest
    item first), or in the order they were opened when ``seed`` is None."""
    row_of = best_fit_decreasing(sizes, capacity)
    rows = int(row_of.max()) + 1 if len(row_of) else 0
    if seed is not None and rows:
        rank = np.empty(rows, dtype=np.int64)
        rank[np.random.default_rng(seed).permutation(rows)] = np.arange(rows)
        row_of = rank[row_of]
    items = np.lexsort((np.arange(len(row_of)), row_of))
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=offsets[1:])
    return items, offsets


def packed_row_count(lengths: np.ndarray, capacity: int) -> int:
    """Rows an epoch of records of these token counts packs into (the launcher's steps)."""
    row_of = best_fit_decreasing(packed_sizes(lengths, capacity), capacity)
    return int(row_of.max()) + 1 if len(row_of) else 0


class PackingCache:
    """Epoch packings as ``.npz`` files in a directory beside the dataset index, keyed by
    everything they depend on (the sizes themselves, hashed); written atomically
    (``megatron_ext.io``), so ranks that pack the same epoch at once, or a run killed
    while writing, leave a whole file or none. A directory that cannot be written only
    costs the recomputation."""

    def __init__(self, directory: Optional[str]):
        self.directory = directory

    @staticmethod
    def key(sizes: np.ndarray, capacity: int, seed: Optional[int]) -> str:
        digest = hashlib.sha256(f"{FORMAT} {capacity} {seed}".encode())
        digest.update(np.ascontiguousarray(sizes, dtype=np.int64).tobytes())
        return digest.hexdigest()[:32]

    def pack(self, sizes: np.ndarray, capacity: int, seed: Optional[int]
             ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`pack_epoch`, read from the cache when it holds it."""
        if self.directory is None:
            return pack_epoch(sizes, capacity, seed)
        path = os.path.join(self.directory, f"{self.key(sizes, capacity, seed)}.npz")
        try:
            with np.load(path) as saved:
                items, offsets = saved["items"], saved["offsets"]
            if len(items) == len(sizes) and offsets[-1] == len(sizes):
                return items.astype(np.int64), offsets
        except (OSError, KeyError, ValueError):
            pass
        items, offsets = pack_epoch(sizes, capacity, seed)
        small = np.int32 if len(sizes) < 2**31 else np.int64
        try:
            os.makedirs(self.directory, exist_ok=True)
            with atomic_write(path, "wb", encoding=None) as handle:
                np.savez(handle, items=items.astype(small), offsets=offsets)
        except OSError as exc:
            logger.debug("packing not cached in %s: %s", self.directory, exc)
        return items, offsets
