"""Train/valid/test data for the trainer: splits, blending, global batches.

Why: every rank must agree on every global batch without talking to the
others. Each split is a list of (dataset, record range) parts; sample ``g``
of a split is chosen by a deterministic blend (megatron-core's own
``build_blending_indices``) and a per-part epoch order seeded by ``--seed``.
A global batch is therefore a pure function of (config, consumed samples),
which is what makes resume and TP/PP/DP parity exact. Each rank also knows
the global batch's total loss weight, so the loss is the exact weighted mean
over the global batch however it is split into micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_ext.data.collate import Batch, collate, pack_rows, padded_width, role_weights
from megatron_ext.data.instruction_dataset import InstructionDataset
from megatron_ext.data.sampling import EpochOrder, iterations_for_epochs, micro_batch_records
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

    def records(self, first_sample: int, count: int) -> list[tuple[InstructionDataset, int]]:
        """(dataset, record index) of samples ``first_sample ...``, as every rank sees them."""
        if len(self.parts) == 1:
            part = self.parts[0]
            return [(part.dataset, part.start + int(i))
                    for i in self.orders[0].records(first_sample, count)]
        which, nth = self._blend_indices(first_sample + count)
        out = []
        for sample in range(first_sample, first_sample + count):
            k = int(which[sample])
            part = self.parts[k]
            out.append((part.dataset, part.start + int(self.orders[k].records(int(nth[sample]), 1)[0])))
        return out


def build_splits(data_args, seed: int) -> dict[str, Optional[SplitData]]:
    """Train/valid/test splits from ``--data_path`` + ``--split`` or the explicit paths."""
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
    return out


@dataclass
class GlobalBatch:
    micro_batches: list[Batch]  # this DP rank's micro-batches
    total_weight: float  # loss weight of the whole global batch (all DP ranks)
    real_tokens: int  # non-padding positions of the whole global batch
    padded_tokens: int  # positions including padding, whole global batch


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

    def global_batch(self, split: SplitData, first_sample: int, size: int) -> GlobalBatch:
        chosen = split.records(first_sample, size)
        samples = [ds[index] for ds, index in chosen]
        total_weight = 0.0
        real = 0
        for tokens, roles in samples:  # same order on every rank: identical float sums
            take = min(len(tokens) - 1, self.seq_length)
            total_weight += float(self.weights[roles[1:take + 1]].sum())
            real += take
        mine = micro_batch_records(np.arange(size), self.dp_rank, self.dp_size,
                                   self.micro_batch_size)
        micro = [collate([[samples[i] for i in row] for row in self._rows(samples, group)],
                         self.seq_length, self.pad_id, self.scalar_loss_mask,
                         self.variable_seq_lengths, self.width_multiple) for group in mine]
        padded = self._padded_positions(samples)
        return GlobalBatch(micro, total_weight, real, padded)

    def _length(self, sample) -> int:
        return min(len(sample[0]) - 1, self.seq_length)

    def _rows(self, samples, group) -> list[list[int]]:
        """A micro-batch's rows: one sample each, or packed (``--pack_sequences``)."""
        if not self.pack:
            return [[i] for i in group]
        lengths = [self._length(samples[i]) for i in group]
        return [[group[j] for j in row] for row in pack_rows(lengths, self.seq_length)]

    def _padded_positions(self, samples) -> int:
        """Positions the whole global batch computes, padding included."""
        total = 0
        groups = [micro_batch_records(np.arange(len(samples)), r, self.dp_size, self.micro_batch_size)
                  for r in range(self.dp_size)]
        for rank_groups in groups:
            for group in rank_groups:
                rows = self._rows(samples, list(group))
                longest = max(sum(self._length(samples[i]) for i in row) for row in rows)
                width = padded_width(longest, self.seq_length, self.variable_seq_lengths,
                                     self.width_multiple)
                total += width * len(rows)
        return total


def iterations(schedule, train: SplitData) -> int:
    if schedule.train_iters is not None:
        return schedule.train_iters
    return iterations_for_epochs(schedule.epochs, len(train), schedule.global_batch_size)
