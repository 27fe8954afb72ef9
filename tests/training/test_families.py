"""Every model family builds and trains (single process); options that change the model run."""

from __future__ import annotations

import math

import pytest

from tests.training.conftest import model_args, torchrun, train_metrics

FAMILY_ARGS = {
    "llama3": ["--recompute_granularity", "selective"],
    "mistral": ["--sliding_window_size", "16", "--recompute_granularity", "full"],
    "gpt": [],  # LayerNorm, GeLU, learned positions, biases, tied embeddings
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_ARGS))
def test_family_trains(tmp_path, train_data, family):
    args = model_args(train_data, 4) + ["--model_name", family, *FAMILY_ARGS[family],
                                        "--save", str(tmp_path), "--tensorboard_dir",
                                        str(tmp_path / "tb")]
    result = torchrun(1, args)
    train = train_metrics(tmp_path)
    assert len(train) == 4 and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert "validation at iter 4" in result.stderr
    assert (tmp_path / "iter_0000004").is_dir()
