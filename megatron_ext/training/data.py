"""Train/valid/test data for the trainer: splits, blending, global batches.

Why: every rank must agree on every global batch without talking to the
others. Each split is a list of (dataset, record range) parts; sample ``g``
of a split is chosen by a deterministic blend (megatron-core's own
``build_blending_indices``) and a per-part epoch order seeded by ``--seed``.
A global batch is therefore a pure function of (config, consumed samples),
which is what makes resume and TP/PP/DP parity exact. Each rank also knows
the global batch's total loss weight, so the loss is the exact weighted mean
over the global batch however it is split into micro-batches.

With ``--pack_sequences`` a sample is a packed row (:class:`PackedSplit`): epoch
``e``'s records (samples ``e*N ... (e+1)*N - 1`` of the split above, ``N`` its
records) are packed by best-fit decreasing into rows of ``--seq_length`` positions
(``data/packing.py``) and the rows shuffled with (seed, epoch): the rows, too, are
a pure function of (config, consumed samples), cached beside the dataset index.
(``--pack_scope micro_batch``: the records of each micro-batch packed, a sample
stays a record.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_ext.data.collate import Batch, collate, pack_rows, padded_width, role_weights
from megatron_ext.data.instruction_dataset import InstructionDataset
from megatron_ext.data.packing import PackingCache, packed_sizes
from megatron_ext.data.sampling import EpochOrder, micro_batch_records
from megatron_ext.errors import ConfigError


def parse_weighted_prefixes(values: tuple[str, ...], flag: str) -> list[tuple[float, str]]:
    """``a`` or ``0.7 a 0.3 b`` to ``[(weight, prefix), ...]`` (weights normalised)."""
    if not values:
        return []
    if len(values) == 1:
        return [(1.0, values[0])]
    if len(values) % 2:
        raise ConfigError(f"{flag}: give one prefix, or weight/prefix pairs like '0.7 a 0.3 b'")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} is not a weight (expected '0.7 a 0.3 b')") from None
    total = sum(w for w, _ in pairs)
    if total <= 0 or any(w < 0 for w, _ in pairs):
        raise ConfigError(f"{flag}: weights must be non-negative with a positive sum")
    return [(w / total, p) for w, p in pairs]


def split_ranges(num_records: int, split: str) -> list[tuple[int, int]]:
    """``--split 98,1,1`` as three contiguous record ranges (Megatron's rule)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected numbers like 98,1,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if sum(parts) <= 0:
        raise ConfigError(f"--split {split!r} sums to zero")
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + int(round(part / sum(parts) * num_records)))
    bounds[-1] = num_records
    bounds = [min(b, num_records) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


@dataclass
class _Part:
    dataset: InstructionDataset
    start: int
    stop: int
    weight: float

    def __len__(self) -> int:
        return self.stop - self.start


class SplitData:
    """One split (train, valid or test): blended parts, deterministic order."""

    def __init__(self, name: str, parts: list[_Part], seed: int, shuffle: bool = True):
        self.name = name
        self.parts = [p for p in parts if len(p) > 0]
        if not self.parts:
            raise ConfigError(f"the {name} split is empty: check --split or the {name} data path")
        self.seed = seed
        self.orders = [EpochOrder(len(p), seed + 7919 * i, shuffle) for i, p in enumerate(self.parts)]
        self._blend: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _blend_indices(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self._blend is None or len(self._blend[0]) < size:
            from megatron.core.datasets import helpers

            size = max(size, 2 * (len(self._blend[0]) if self._blend else 0), 1024)
            which = np.zeros(size, dtype=np.int16)
            nth = np.zeros(size, dtype=np.int64)
            weights = np.array([p.weight for p in self.parts], dtype=np.float64)
            helpers.build_blending_indices(which, nth, weights / weights.sum(), len(self.parts),
                                           size, False)
            self._blend = (which, nth)
        return self._blend

    def sample_ids(self, first_sample: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(part number, record index in its dataset) of samples ``first_sample ...``, as
        every rank sees them (arrays)."""
        if len(self.parts) == 1:
            return (np.zeros(count, dtype=np.int64),
                    self.parts[0].start + self.orders[0].records(first_sample, count))
        which, nth = self._blend_indices(first_sample + count)
        which = which[first_sample:first_sample + count].astype(np.int64)
        nth = nth[first_sample:first_sample + count]
        records = np.empty(count, dtype=np.int64)
        for k in np.unique(which):
            chosen = which == k
            records[chosen] = self.parts[k].start + self.orders[k].of(nth[chosen])
        return which, records

    def records(self, first_sample: int, count: int) -> list[tuple[InstructionDataset, int]]:
        """(dataset, record index) of samples ``first_sample ...``, as every rank sees them."""
        parts, records = self.sample_ids(first_sample, count)
        return [(self.parts[k].dataset, int(i)) for k, i in zip(parts, records)]

    def rows(self, first_sample: int, count: int) -> list[list[tuple[InstructionDataset, int]]]:
        """The records of samples ``first_sample ...``: one each."""
        return [[record] for record in self.records(first_sample, count)]

    def samples_for_epochs(self, epochs: float) -> float:
        return epochs * len(self)


class PackedSplit:
    """A split whose samples are rows of records packed to ``capacity`` positions.

    Epoch ``e`` packs samples ``e*N ... (e+1)*N - 1`` of ``split`` (``N`` = its records:
    for one dataset, each record once, in the epoch's shuffled order) with best-fit
    decreasing (``data/packing.py``); a shuffled split's rows are then shuffled with
    (seed, epoch). Row ``g`` of the run is row ``g - (rows of earlier epochs)`` of its
    epoch, so any rank, a resumed run, a run at another DP size finds the same rows.
    """

    KEEP = 2  # epochs held in memory

    def __init__(self, split: SplitData, capacity: int):
        self.split, self.capacity = split, capacity
        self.name, self.parts = split.name, split.parts
        self.cache = PackingCache(f"{split.parts[0].dataset.prefix}-packing")
        self._counts: list[int] = []  # rows of epochs 0, 1, ...
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._filled: dict[int, int] = {}  # positions the records of an epoch take

    @property
    def records_per_epoch(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        """Rows of the first epoch."""
        return self._rows_in(0)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(part numbers, record indexes) of the epoch's samples, and its rows as
        :func:`~megatron_ext.data.packing.pack_epoch`'s (items, offsets) over them."""
        if epoch not in self._epochs:
            n = len(self.split)
            parts, records = self.split.sample_ids(epoch * n, n)
            lengths = np.empty(n, dtype=np.int64)
            for k in np.unique(parts):
                chosen = parts == k
                lengths[chosen] = self.parts[k].dataset.lengths[records[chosen]]
            seed = [self.split.seed, epoch] if self.split.orders[0].shuffle else None
            sizes = packed_sizes(lengths, self.capacity)
            items, offsets = self.cache.pack(sizes, self.capacity, seed)
            self._filled[epoch] = int(sizes.sum())
            if len(self._epochs) >= self.KEEP:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (parts, records, items, offsets)
        return self._epochs[epoch]

    def padding(self, epoch: int) -> float:
        """Share of an epoch's rows of ``capacity`` positions left empty."""
        rows = self._rows_in(epoch)
        if epoch not in self._filled:
            self.epoch(epoch)
        return 1.0 - self._filled[epoch] / max(1, rows * self.capacity)

    def _rows_in(self, epoch: int) -> int:
        while len(self._counts) <= epoch:
            self._counts.append(len(self.epoch(len(self._counts))[3]) - 1)
        return self._counts[epoch]

    def _locate(self, sample: int) -> tuple[int, int]:
        """(epoch, row in it) of row ``sample`` of the run."""
        epoch = 0
        while sample >= self._rows_in(epoch):
            sample -= self._rows_in(epoch)
            epoch += 1
        return epoch, sample

    def rows(self, first_sample: int, count: int) -> list[list[tuple[InstructionDataset, int]]]:
        """The records of rows ``first_sample ...``, as every rank sees them."""
        out: list[list[tuple[InstructionDataset, int]]] = []
        epoch, row = self._locate(first_sample)
        while len(out) < count:
            parts, records, items, offsets = self.epoch(epoch)
            stop = min(len(offsets) - 1, row + count - len(out))
            out += [[(self.parts[parts[i]].dataset, int(records[i]))
                     for i in items[offsets[r]:offsets[r + 1]]] for r in range(row, stop)]
            epoch, row = epoch + 1, 0
        return out

    def samples_for_epochs(self, epochs: float) -> float:
        """Rows in ``epochs`` passes (a fraction of the last epoch's rows)."""
        whole = int(epochs)
        rows = float(sum(self._rows_in(e) for e in range(whole)))
        if epochs > whole:
            rows += (epochs - whole) * self._rows_in(whole)
        return rows


def build_splits(data_args, seed: int, packed_length: Optional[int] = None
                 ) -> dict[str, "Optional[SplitData | PackedSplit]"]:
    """Train/valid/test splits from ``--data_path`` + ``--split`` or the explicit paths;
    with ``packed_length`` their samples are rows of records packed to that many
    positions (:class:`PackedSplit`)."""
    opened: dict[str, InstructionDataset] = {}

    def dataset(prefix: str) -> InstructionDataset:
        if prefix not in opened:
            opened[prefix] = InstructionDataset(prefix)
        return opened[prefix]

    splits: dict[str, list[_Part]] = {"train": [], "valid": [], "test": []}
    if data_args.data_path:
        for weight, prefix in parse_weighted_prefixes(data_args.data_path, "--data_path"):
            ds = dataset(prefix)
            for name, (start, stop) in zip(splits, split_ranges(len(ds), data_args.split)):
                splits[name].append(_Part(ds, start, stop, weight))
    for name, values, flag in (("train", data_args.train_data_path, "--train_data_path"),
                               ("valid", data_args.valid_data_path, "--valid_data_path"),
                               ("test", data_args.test_data_path, "--test_data_path")):
        for weight, prefix in parse_weighted_prefixes(values, flag):
            ds = dataset(prefix)
            splits[name].append(_Part(ds, 0, len(ds), weight))
    out: dict[str, Optional[SplitData]] = {}
    for name, parts in splits.items():
        if name == "train":
            out[name] = SplitData(name, parts, seed)
        else:
            nonempty = [p for p in parts if len(p) > 0]
            out[name] = SplitData(name, nonempty, seed, shuffle=False) if nonempty else None
    if packed_length is not None:
        out = {name: split and PackedSplit(split, packed_length) for name, split in out.items()}
    return out


@dataclass
class GlobalBatch:
    micro_batches: list[Batch]  # this DP rank's micro-batches
    total_weight: float  # loss weight of the whole global batch (all DP ranks)
    real_tokens: int  # non-padding positions of the whole global batch
    padded_tokens: int  # positions including padding, whole global batch
    rows: int = 0  # samples of the global batch (rows unless packed per micro-batch)
    records: int = 0  # records in them


class BatchBuilder:
    """Turns a split and a sample position into this rank's micro-batches."""

    def __init__(self, seq_length: int, pad_id: int, scalar_loss_mask: float,
                 variable_seq_lengths: bool, micro_batch_size: int, dp_rank: int, dp_size: int,
                 pack: bool = False, multiple: int = 1):
        """``multiple``: what every row's width must be a multiple of (context and
        sequence parallelism: ``ParallelArgs.sequence_multiple``). ``seq_length`` is one
        (``TrainConfig.validate``); variable widths are rounded up to a multiple of both
        it and 16, at most ``seq_length``."""
        self.seq_length = seq_length
        self.width_multiple = math.lcm(16, multiple)
        self.pack = pack
        self.pad_id = pad_id
        self.scalar_loss_mask = scalar_loss_mask
        self.variable_seq_lengths = variable_seq_lengths
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.weights = role_weights(scalar_loss_mask).astype(np.float64)

    def global_batch(self, split: "SplitData | PackedSplit", first_sample: int,
                     size: int) -> GlobalBatch:
        """Samples ``first_sample ... first_sample + size - 1`` of ``split``: this rank's
        micro-batches, and the whole global batch's loss weight and token counts."""
        samples = [[ds[index] for ds, index in row] for row in split.rows(first_sample, size)]
        total_weight = 0.0
        real = 0
        for tokens, roles in (record for row in samples for record in row):
            # same order on every rank: identical float sums
            take = min(len(tokens) - 1, self.seq_length)
            total_weight += float(self.weights[roles[1:take + 1]].sum())
            real += take
        mine = micro_batch_records(np.arange(size), self.dp_rank, self.dp_size,
                                   self.micro_batch_size)
        micro = [collate(self._rows(samples, group), self.seq_length, self.pad_id,
                         self.scalar_loss_mask, self.variable_seq_lengths,
                         self.width_multiple) for group in mine]
        padded = self._padded_positions(samples)
        return GlobalBatch(micro, total_weight, real, padded, rows=size,
                           records=sum(len(row) for row in samples))

    def _length(self, sample) -> int:
        return min(len(sample[0]) - 1, self.seq_length)

    def _rows(self, samples, group) -> list[list]:
        """A micro-batch's rows of records: its samples, or their records packed
        (``--pack_scope micro_batch``)."""
        if not self.pack:
            return [samples[i] for i in group]
        records = [record for i in group for record in samples[i]]
        lengths = [self._length(record) for record in records]
        return [[records[j] for j in row] for row in pack_rows(lengths, self.seq_length)]

    def _padded_positions(self, samples) -> int:
        """Positions the whole global batch computes, padding included."""
        total = 0
        groups = [micro_batch_records(np.arange(len(samples)), r, self.dp_size, self.micro_batch_size)
                  for r in range(self.dp_size)]
        for rank_groups in groups:
            for group in rank_groups:
                rows = self._rows(samples, list(group))
                longest = max(min(self.seq_length, sum(self._length(record) for record in row))
                              for row in rows)
                width = padded_width(longest, self.seq_length, self.variable_seq_lengths,
                                     self.width_multiple)
                total += width * len(rows)
        return total


def iterations(schedule, train: "SplitData | PackedSplit") -> int:
    """``--train_iters``, or ``--epochs`` as optimizer steps: every sample (record, or
    packed row) seen ``epochs`` times, the last step partial."""
    if schedule.train_iters is not None:
        return schedule.train_iters
    return max(1, math.ceil(train.samples_for_epochs(schedule.epochs)
                            / schedule.global_batch_size))
