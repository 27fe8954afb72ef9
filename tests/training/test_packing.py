"""--pack_sequences: several samples per row, the same loss as one sample per row."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ext.data.collate import collate, pack_rows
from tests.runs import model_args, start_runs, started, starts_early, train_metrics
from tests.training.test_parallel import assert_same_curve


def test_pack_rows_first_fit_decreasing_within_capacity():
    lengths = [50, 90, 30, 60, 10, 100]
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == [[0], [1, 4], [2, 3], [5]]  # 50 | 90+10 | 30+60 | 100: four rows, not six
    assert pack_rows(lengths, 100) == rows  # deterministic


def test_packed_rows_restart_positions_and_keep_samples_apart():
    a = (np.arange(1, 6), np.full(5, 2))
    b = (np.arange(10, 14), np.full(4, 2))
    batch = collate([[a, b]], seq_length=16, pad_id=0, variable_seq_lengths=True)
    assert batch.position_ids[0, :7].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.segment_ids[0].tolist() == [1] * 4 + [2] * 3 + [0] * 9
    assert batch.labels[0, :7].tolist() == [2, 3, 4, 5, 11, 12, 13]


@starts_early("packing_runs")
def start_packing_runs(request):
    """Packed at PP=2 (two processes) beside one sample per row (one)."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("packing")
    base = model_args(request.getfixturevalue("train_data"), 4) + [
        "--seq_length", "192", "--micro_batch_size", "4"]
    plain = start_runs(1, [{"name": "plain", "argv": base + [
        "--save", str(root / "plain")]}], root / "serial", early=True)
    packed = start_runs(2, [{"name": "packed", "argv": base + [
        "--pack_sequences", "--pipeline_model_parallel_size", "2",
        "--save", str(root / "packed")]}], root / "parallel", early=True)
    return root, plain, packed


@pytest.fixture(scope="module")
def packing_runs(request):
    root, plain, packed = started("packing_runs", request)
    return root, {**packed.wait(), **plain.wait()}


@pytest.mark.slow
def test_packed_training_has_the_unpacked_loss_curve(packing_runs):
    """Packed at PP=2 (shapes vary per micro-batch between stages) against one sample per
    row in one process: the same losses and grad norms."""
    root, results = packing_runs
    assert results["packed"].returncode == 0
    assert results["plain"].returncode == 0
    plain = train_metrics(root / "plain")
    packed = train_metrics(root / "packed")
    assert_same_curve(packed, plain)
    # fewer positions computed for the same samples
    assert sum(r["padding_fraction"] for r in packed) < sum(r["padding_fraction"] for r in plain)


def test_a_one_token_sample_does_not_drop_the_rest_of_its_row():
    lone = (np.array([7]), np.array([2]))
    b = (np.arange(10, 14), np.full(4, 2))
    batch = collate([[lone, b]], seq_length=16, pad_id=0, variable_seq_lengths=True)
    assert batch.labels[0, :3].tolist() == [11, 12, 13]
    assert batch.real_tokens == 3
