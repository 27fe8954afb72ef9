"""Loss masking and normalisation: the trainer's loss is the exact global weighted mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_ext.data.collate import collate
from megatron_ext.models.masks import attention_mask
from megatron_ext.training.step import loss_func
from tests.runs import call_job, start_runs, started, starts_early


@starts_early("loss_checks")
def start_loss_checks(request):
    train_data = request.getfixturevalue("train_data")
    directory = request.getfixturevalue("tmp_path_factory").mktemp("loss")
    return start_runs(1, [call_job(
        str(scalar), "tests.training.check_loss:main",
        [train_data["prefix"], train_data["vocab_file"], str(scalar)]) for scalar in (0.0, 0.3)],
        directory, early=True)


@pytest.fixture(scope="module")
def loss_checks(request) -> dict:
    """check_loss.py for both --scalar_loss_mask values, in a run_many.py worker."""
    results = started("loss_checks", request).wait()
    return {scalar: json.loads(results[str(scalar)].stdout.strip().splitlines()[-1])
            for scalar in (0.0, 0.3)}


@pytest.mark.slow
@pytest.mark.parametrize("scalar", [0.0, 0.3])
def test_trainer_loss_is_the_global_weighted_mean(loss_checks, scalar):
    result = loss_checks[scalar]
    assert result["micro_batches"] == 3 and len(set(result["widths"])) > 1  # uneven lengths
    assert result["denominator"] == pytest.approx(result["total_weight"])
    assert result["trainer"] == pytest.approx(result["reference"], rel=1e-6)


def test_loss_func_divides_by_the_global_weight_not_the_micro_batch():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    weights = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, count, report = loss_func(weights, 10.0, per_token)
    assert loss.item() == pytest.approx(0.5)  # (2 + 3) / 10
    assert count.dtype == torch.int and count.item() == 0  # no extra scaling by megatron-core
    assert report["lm loss"].tolist() == [5.0, 2.0]


def test_micro_batch_sums_equal_the_mean_over_uneven_samples():
    """Mean of per-micro-batch means over-weights short samples; ours does not."""
    rng = np.random.default_rng(0)
    samples = []
    for n in (5, 40, 7, 33):
        roles = np.array([1] * (n // 2) + [2] * (n - n // 2), dtype=np.uint8)
        samples.append((rng.integers(3, 50, n), roles))
    ce = {i: torch.rand(64) for i in range(4)}
    total = sum(float(collate([[s]], 64, 0).loss_weights.sum()) for s in samples)
    ours = 0.0
    flat_weights, flat_ce = [], []
    for group in ([0, 1], [2, 3]):
        batch = collate([[samples[i]] for i in group], 64, 0)
        per_token = torch.stack([ce[i][: batch.tokens.shape[1]] for i in group])
        ours += float(loss_func(batch.loss_weights, total, per_token)[0])
        flat_weights.append(batch.loss_weights.flatten())
        flat_ce.append(per_token.flatten())
    w, c = torch.cat(flat_weights), torch.cat(flat_ce)
    assert ours == pytest.approx(float((w * c).sum() / w.sum()), rel=1e-6)


def test_attention_mask_is_causal_within_samples_and_ignores_padding():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = ~attention_mask(segments)[0, 0]  # True = may attend
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    windowed = ~attention_mask(torch.ones(1, 5, dtype=torch.int32), window=2)[0, 0]
    assert windowed[4].tolist() == [False, False, False, True, True]
