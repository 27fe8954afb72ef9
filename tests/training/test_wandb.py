"""``--wandb_project``: the scalars of metrics.jsonl also go to Weights & Biases (offline
mode: the run's file on disk), and a resumed run continues the same W&B run."""

from __future__ import annotations

import json

import pytest

from tests.runs import model_args, run_many, train_metrics

pytestmark = pytest.mark.slow


def test_wandb_offline_run_gets_the_same_scalars(tmp_path, train_data):
    import importlib
    import os

    importlib.import_module("wandb")  # a test dependency (setup.py [test]): never skipped

    assert os.environ["WANDB_MODE"] == "offline"  # tests/conftest.py, for the workers too
    save = tmp_path / "run"
    args = model_args(train_data, 4) + ["--save", str(save), "--wandb_project", "sft-test"]
    results = run_many(1, [{"name": "stopped", "argv": args + ["--exit_interval", "2"]},
                           {"name": "resumed", "argv": args + ["--load", str(save)]}],
                       tmp_path / "launch")
    assert all(r.returncode == 0 for r in results.values()), results["stopped"].log[-3000:]
    run_id = (save / "wandb_run_id").read_text().strip()
    runs = sorted((save / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, "each launch writes its part of the one run (same id)"
    logged = b"".join(path.read_bytes() for run in runs for path in run.glob("*.wandb"))
    assert b"train/loss" in logged and b"train/grad_norm" in logged and b"valid/loss" in logged
    for record in train_metrics(save):  # every iteration's loss, as metrics.jsonl has it
        assert json.dumps(record["loss"]).encode() in logged, record


def test_wandb_needs_save():
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.arguments import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(
        ["--data_path", "x", "--vocab_file", "t.model", "--train_iters", "1",
         "--wandb_project", "p"]))
    with pytest.raises(ConfigError, match="--wandb_project needs --save"):
        config.validate(1)
