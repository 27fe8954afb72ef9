"""--pack_sequences: rows of records packed across the dataset (a sample is a row), on the
serial packed run's curve at PP=2, DP=2 and TP=2 (CP=2: test_context_parallel.py), resumed
mid-epoch at another DP size; documents inside a row as if alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_ext.data.collate import collate, pack_rows
from tests.runs import call_job, model_args, start_runs, started, starts_early, train_metrics
from tests.training.test_parallel import assert_same_curve

PACK = ["--pack_sequences"]


def test_pack_rows_first_fit_decreasing_within_capacity():
    """--pack_scope micro_batch's packing of one micro-batch."""
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
    """One 2-process batch, in order: packed at PP=2; at DP=2 stopped after iteration 3,
    then resumed at TP=2 (DP=1) to the end. One 1-process batch: the isolation check."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("packing")
    base = model_args(request.getfixturevalue("train_data"), 6) + PACK
    resumed = str(root / "dp2-tp2")
    parallel = start_runs(2, [
        {"name": "pp2", "argv": base + ["--pipeline_model_parallel_size", "2",
                                        "--save", str(root / "pp2")]},
        {"name": "dp2", "argv": base + ["--exit_interval", "3", "--save", resumed]},
        {"name": "tp2", "argv": base + ["--tensor_model_parallel_size", "2",
                                        "--load", resumed, "--save", resumed]},
    ], root / "parallel", early=True)
    isolation = start_runs(1, [call_job("isolation", "tests.training.check_packing:main",
                                        [str(root / "isolation.json")])],
                           root / "serial", early=True)
    return root, parallel, isolation


@pytest.fixture(scope="module")
def packing_runs(request):
    root, parallel, isolation = started("packing_runs", request)
    results = {**parallel.wait(), **isolation.wait()}
    assert all(r.returncode == 0 for r in results.values()), {
        name: r.log[-3000:] for name, r in results.items() if r.returncode}
    return root, results


@pytest.mark.slow
def test_packed_training_at_pp2_matches_the_serial_packed_run(packing_runs, packed_reference):
    root, _ = packing_runs
    assert_same_curve(train_metrics(root / "pp2"), packed_reference, rtol=1e-6)


@pytest.mark.slow
def test_packed_run_resumes_mid_epoch_at_another_dp_size(packing_runs, packed_reference,
                                                         train_data):
    """Iterations 1-3 at DP=2, then (from the checkpoint of iteration 3, 24 rows into the
    first epoch) 4-6 at TP=2, DP=1: the serial run's curve."""
    from megatron_ext.training.config import DataArgs
    from megatron_ext.training.data import build_splits

    root, results = packing_runs
    assert "resuming at iteration 3" in results["tp2"].log
    assert_same_curve(train_metrics(root / "dp2-tp2"), packed_reference, rtol=1e-6)
    rows = len(build_splits(DataArgs(data_path=(train_data["prefix"],), split="90,10,0"),
                            1234, 96)["train"])
    assert rows > 24 and 24 % rows  # resumed mid-epoch (rows across epochs: tests/data)


@pytest.mark.slow
def test_a_packed_step_is_rows_of_several_records_with_little_padding(packed_reference,
                                                                      reference):
    """With --pack_sequences a sample is a row: 8 rows a step holding more records, the
    loss the mean over their answer tokens, and less padding than one record a row."""
    assert all(r["rows"] == 8 and r["records"] > 8 for r in packed_reference)
    assert [r["consumed_samples"] for r in packed_reference] == [8 * i for i in range(1, 7)]
    assert (sum(r["padding_fraction"] for r in packed_reference)
            < sum(r["padding_fraction"] for r in reference) / 2)


@pytest.mark.slow
def test_documents_in_a_packed_row_have_their_losses_alone(packing_runs):
    """The isolation proof: each document's token losses inside a packed row equal its
    losses alone in a row (Llama, Mistral's window, GPT's learned positions); with the
    documents' mask replaced by a causal one they would not."""
    root, _ = packing_runs
    report = json.loads((root / "isolation.json").read_text())
    for name, result in report.items():
        assert result["documents"] == 3 and result["packed_width"] == 96
        assert result["max_abs_diff"] <= 1e-5 * result["scale"], (name, result)
        assert result["leak"] > 1e-3, (name, result)


def test_a_one_token_sample_does_not_drop_the_rest_of_its_row():
    lone = (np.array([7]), np.array([2]))
    b = (np.arange(10, 14), np.full(4, 2))
    batch = collate([[lone, b]], seq_length=16, pad_id=0, variable_seq_lengths=True)
    assert batch.labels[0, :3].tolist() == [11, 12, 13]
    assert batch.real_tokens == 3
