"""Dataset-level packing (--pack_sequences): best-fit decreasing, the packed splits' rows,
their batches (padding, every record once per epoch, no row past --seq_length), resume and
DP sizes, the cache beside the dataset index. In-process, on generated data and the
bundled sample."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from megatron_ext.data.indexed import AtomicDatasetOutputs
from megatron_ext.data.packing import (
    PackingCache,
    best_fit_decreasing,
    pack_epoch,
    packed_row_count,
    packed_sizes,
)
from megatron_ext.training.config import DataArgs, ScheduleArgs
from megatron_ext.training.data import BatchBuilder, PackedSplit, build_splits, iterations
from tests.conftest import SAMPLE
from tests.data.test_preprocess import preprocess


def naive_best_fit(sizes, capacity):
    """Best-fit decreasing, one item at a time: the rows' fills (sorted)."""
    rooms = []
    for size in sorted(sizes, reverse=True):
        fits = [r for r, room in enumerate(rooms) if room >= size]
        if fits:
            best = min(fits, key=lambda r: rooms[r])
            rooms[best] -= size
        else:
            rooms.append(capacity - size)
    return sorted(capacity - room for room in rooms)


def test_best_fit_decreasing_is_best_fit_decreasing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacity = int(rng.integers(1, 60))
        sizes = rng.integers(1, capacity + 1, int(rng.integers(0, 80)))
        rows = best_fit_decreasing(sizes, capacity)
        fills = np.bincount(rows, weights=sizes).astype(int) if len(sizes) else np.zeros(0)
        assert sorted(fills.tolist()) == naive_best_fit(sizes.tolist(), capacity)
        assert (fills <= capacity).all()
    sizes = np.array([50, 90, 30, 60, 10, 100, 40])
    # 100 | 90+10 | 60+40 | 50+30: the 40 takes the room of 40, not of 50
    assert best_fit_decreasing(sizes, 100).tolist() == [3, 1, 3, 2, 1, 0, 2]
    with pytest.raises(ValueError, match="1..100"):
        best_fit_decreasing(np.array([0, 5]), 100)


def test_an_epoch_of_a_million_records_packs_in_seconds():
    rng = np.random.default_rng(1)
    sizes = np.clip(rng.lognormal(4.5, 0.8, 1_000_000).astype(np.int64), 1, 512)
    start = time.perf_counter()
    items, offsets = pack_epoch(sizes, 512, seed=[1, 0])
    assert time.perf_counter() - start < 10  # about 0.3 s on one core
    assert (np.bincount(items, minlength=len(sizes)) == 1).all()  # each record once
    fills = np.add.reduceat(sizes[items], offsets[:-1])
    assert fills.max() <= 512 and 1 - sizes.sum() / (512 * len(fills)) < 0.01


def write_dataset(prefix, lengths, seed=0):
    """A dataset of records of these token counts (random ids; the first half of each
    record user tokens, the rest assistant)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = rng.integers(3, 1000, int(lengths.sum()))
    roles = np.concatenate([np.r_[np.ones(n // 2), np.full(n - n // 2, 2)] for n in lengths])
    with AtomicDatasetOutputs(str(prefix), np.uint16) as out:
        out.add(tokens, roles.astype(np.uint8), lengths)
        out.commit({})
    return str(prefix)


def epoch_batches(split, seq_length, micro_batch_size=4, dp_size=1, variable=False):
    """The global batches (of one micro-batch per rank) that cover the split's first
    epoch's rows, from every DP rank."""
    builders = [BatchBuilder(seq_length, 0, 0.0, variable, micro_batch_size, rank, dp_size)
                for rank in range(dp_size)]
    size = micro_batch_size * dp_size
    return [[builder.global_batch(split, first, size) for builder in builders]
            for first in range(0, len(split), size)]


SHORT = np.random.default_rng(2).integers(20, 180, 3000)  # short-record SFT (math problems)
MIXED = np.clip(np.random.default_rng(3).lognormal(5.5, 1.0, 1500), 8, 4000).astype(int)


@pytest.fixture(scope="module")
def sample_prefix(tmp_path_factory, sp_model):
    """The bundled sample's training records, tokenized (ChatML, not truncated)."""
    lines = (SAMPLE / "training.jsonl").read_text(encoding="utf-8").splitlines()
    import json

    prefix, _ = preprocess(tmp_path_factory.mktemp("sample"), map(json.loads, lines),
                           "SentencePieceTokenizer", sp_model, "--system_key", "system")
    return str(prefix)


@pytest.mark.parametrize("seq_length", [512, 2048])
@pytest.mark.parametrize("data", ["short", "mixed", "sample"])
def test_packed_epoch_is_every_record_once_in_full_rows(tmp_path, request, data, seq_length):
    if data == "sample":
        prefix = request.getfixturevalue("sample_prefix")
    else:
        prefix = write_dataset(tmp_path / data, SHORT if data == "short" else MIXED)
    split = build_splits(DataArgs(train_data_path=(prefix,)), 7, seq_length)["train"]
    assert isinstance(split, PackedSplit)
    batches = [gb for ranks in epoch_batches(split, seq_length) for gb in ranks]
    real = sum(gb.real_tokens for gb in batches)
    padded = sum(gb.padded_tokens for gb in batches)
    assert 1 - real / padded <= 0.03, (data, seq_length, 1 - real / padded)
    # every record once per epoch: the rows of epoch 0, in the order the batches take them
    seen = [i for _, i in (record for row in split.rows(0, len(split)) for record in row)]
    assert sorted(seen) == list(range(split.records_per_epoch))
    # no row past --seq_length, and no record cut but those longer than a row: each
    # row's positions are its records' (tokens - 1) each
    lengths = split.parts[0].dataset.lengths
    rows = split.rows(0, 4 * len(batches))
    positions = [sum(min(int(lengths[i]) - 1, seq_length) for _, i in row) for row in rows]
    got = [int(n) for gb in batches for mb in gb.micro_batches
           for n in (mb.segment_ids > 0).sum(dim=1)]
    assert got == positions and max(positions) <= seq_length
    assert all(mb.tokens.shape[1] == seq_length for gb in batches for mb in gb.micro_batches)


def flat(rows):
    return [(ds.prefix, i) for row in rows for ds, i in row]


def test_packed_rows_are_a_function_of_the_position_across_epochs_and_dp(tmp_path):
    """What resume and parallelism rest on: any window of rows, read by a fresh split
    (a resumed run), is the same window of the straight run's rows, across epochs too;
    DP=2's ranks together take DP=1's micro-batches, with the same loss weight."""
    prefix = write_dataset(tmp_path / "d", SHORT[:300])
    straight = build_splits(DataArgs(train_data_path=(prefix,)), 7, 512)["train"]
    per_epoch = len(straight)
    everything = straight.rows(0, 3 * per_epoch)
    for first, count in ((5, 9), (per_epoch - 3, 7), (2 * per_epoch + 1, per_epoch - 1)):
        resumed = build_splits(DataArgs(train_data_path=(prefix,)), 7, 512)["train"]
        assert flat(resumed.rows(first, count)) == flat(everything[first:first + count])
    epochs = [flat(everything[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    assert all(sorted(i for _, i in epoch) == list(range(300)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled, repacked
    other_seed = build_splits(DataArgs(train_data_path=(prefix,)), 8, 512)["train"]
    assert flat(other_seed.rows(0, per_epoch)) != epochs[0]

    one = BatchBuilder(512, 0, 0.0, True, 2, 0, 1).global_batch(straight, 37, 8)
    two = [BatchBuilder(512, 0, 0.0, True, 2, rank, 2).global_batch(straight, 37, 8)
           for rank in range(2)]
    interleaved = [two[0].micro_batches[0], two[1].micro_batches[0],
                   two[0].micro_batches[1], two[1].micro_batches[1]]
    for want, got in zip(one.micro_batches, interleaved):
        assert want.tokens.equal(got.tokens) and want.loss_weights.equal(got.loss_weights)
        assert want.position_ids.equal(got.position_ids)
    assert one.total_weight == two[0].total_weight == two[1].total_weight
    assert one.rows == 8 and one.records == sum(len(row) for row in everything[37:45])

    # --epochs counts packed rows
    schedule = ScheduleArgs(epochs=1.5, global_batch_size=8)
    assert iterations(schedule, straight) == math.ceil(1.5 * per_epoch / 8)
    assert straight.records_per_epoch == 300 and per_epoch < 120


def test_blended_and_unshuffled_splits_pack_their_own_epochs(tmp_path):
    a = write_dataset(tmp_path / "a", SHORT[:200], seed=1)
    b = write_dataset(tmp_path / "b", MIXED[:100], seed=2)
    splits = build_splits(DataArgs(data_path=("0.6", a, "0.4", b), split="90,10,0"), 3, 512)
    train, valid = splits["train"], splits["valid"]
    plain = train.split  # the blended record stream the rows are packed from
    stream = [(ds.prefix, i) for ds, i in plain.records(0, plain.__len__())]
    assert sorted(flat(train.rows(0, len(train)))) == sorted(stream)
    second = [(ds.prefix, i) for ds, i in plain.records(len(plain), len(plain))]
    rows = train.rows(len(train), len(train) + 5)  # epoch 1, then 5 rows of epoch 2
    assert sorted(flat(rows[:-5])) == sorted(second)
    # validation: its records (blended, not shuffled) packed, rows in the order they were
    # opened: the longest record first
    records = valid.split.records(0, len(valid.split))
    assert sorted(flat(valid.rows(0, len(valid)))) == sorted((d.prefix, i) for d, i in records)
    longest = max(records, key=lambda r: r[0].lengths[r[1]])
    assert (longest[0].prefix, longest[1]) in flat(valid.rows(0, 1))


def test_packing_is_cached_beside_the_dataset_index(tmp_path, monkeypatch):
    import megatron_ext.data.packing as packing

    prefix = write_dataset(tmp_path / "d", SHORT[:300])
    rows = flat(build_splits(DataArgs(train_data_path=(prefix,)), 7, 512)["train"].rows(0, 50))
    cached = list((tmp_path / "d-packing").glob("*.npz"))
    assert len(cached) == 1  # epoch 0, beside d-text.idx
    assert not list(tmp_path.glob("d-packing/*.tmp.*"))

    def no_packing(*args):
        raise AssertionError("packed again instead of reading the cache")

    monkeypatch.setattr(packing, "pack_epoch", no_packing)
    again = build_splits(DataArgs(train_data_path=(prefix,)), 7, 512)["train"]
    assert flat(again.rows(0, 50)) == rows
    monkeypatch.undo()
    cached[0].write_bytes(b"not a numpy file")  # a damaged cache is recomputed
    assert flat(build_splits(DataArgs(train_data_path=(prefix,)), 7, 512)["train"]
                .rows(0, 50)) == rows
    # other settings, other entries: another capacity, another seed
    build_splits(DataArgs(train_data_path=(prefix,)), 7, 256)["train"].rows(0, 1)
    build_splits(DataArgs(train_data_path=(prefix,)), 8, 512)["train"].rows(0, 1)
    assert len(list((tmp_path / "d-packing").glob("*.npz"))) == 3
    # the launcher's count (no torch, no split) is the trainer's
    lengths = np.asarray(SHORT[:300])
    assert packed_row_count(lengths, 512) == len(again)
    assert PackingCache(None).pack(packed_sizes(lengths, 512), 512, None)[1][-1] == 300


def test_the_launcher_reads_the_record_lengths_without_megatron_core(tmp_path):
    from megatron_ext.data.indexed import sequence_lengths
    from megatron_ext.data.instruction_dataset import InstructionDataset
    from megatron_ext.errors import DataError

    prefix = write_dataset(tmp_path / "d", MIXED[:50])
    assert sequence_lengths(prefix).tolist() == InstructionDataset(prefix).lengths.tolist()
    (tmp_path / "d-text.idx").write_bytes((tmp_path / "d-text.idx").read_bytes()[:60])
    with pytest.raises(DataError, match="truncated"):
        sequence_lengths(prefix)


def test_pack_scope_micro_batch_keeps_a_sample_a_record(tmp_path):
    """--pack_scope micro_batch: the records of each micro-batch packed, a sample is a
    record (the unpacked run's batches and loss weight, fewer rows)."""
    from megatron_ext.training.data import SplitData

    prefix = write_dataset(tmp_path / "d", SHORT[:64])
    args = DataArgs(train_data_path=(prefix,), pack_sequences=True, pack_scope="micro_batch")
    assert not args.packed_rows and DataArgs(pack_sequences=True).packed_rows
    split = build_splits(args, 7)["train"]
    assert isinstance(split, SplitData)
    packed = BatchBuilder(512, 0, 0.0, True, 8, 0, 1, pack=True).global_batch(split, 0, 16)
    plain = BatchBuilder(512, 0, 0.0, True, 8, 0, 1).global_batch(split, 0, 16)
    assert packed.records == plain.records == packed.rows == 16
    assert packed.total_weight == plain.total_weight and packed.real_tokens == plain.real_tokens
    assert sum(len(mb.tokens) for mb in packed.micro_batches) < 16  # rows: fewer than 16
    assert packed.padded_tokens < plain.padded_tokens


def test_help_says_a_sample_is_a_packed_row():
    from megatron_ext.training.arguments import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "a sample (of --micro_batch_size, --global_batch_size, --epochs' steps, consumed " \
           "samples) is then a packed row of several records" in text
