"""tools/checkpoint_util.py: merge / split round trips, resume after resharding, legacy layout."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.checkpointing.reshard import ReshardConfig, merge
from megatron_ext.checkpointing.unsharded import UnshardedReader
from tests.tools.test_hf_conversion import checkpoint_logits, run_tool
from tests.runs import ITERS, model_args, start_runs, train_metrics
from tests.training.test_parallel import assert_same_curve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(reference_run):
    """6 iterations at TP=1 with checkpoints at 3 and 6: the shared reference run."""
    return reference_run


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory, train_data, straight):
    """Training from resharded checkpoints, all in two launches side by side: from the
    merge at 3 (one process), from its TP=2 split (two), and from a weights-only merge."""
    root = tmp_path_factory.mktemp("resharded")
    merged, split, weights = root / "merged", root / "tp2", root / "weights"
    merge(ReshardConfig(load=str(straight), out=str(merged), iteration=3))
    run_tool("checkpoint_util.py", "split", "--load", str(merged), "--out", str(split),
             "--target_tp", "2")
    run_tool("checkpoint_util.py", "merge", "--load", str(straight), "--out", str(weights),
             "--no_optimizer")
    serial = start_runs(1, [
        {"name": "from_merged", "argv": model_args(train_data, ITERS) + [
            "--load", str(merged), "--save", str(root / "from_merged")]},
        {"name": "weights", "argv": model_args(train_data, ITERS) + [
            "--load", str(weights), "--save", str(root / "run")]},
    ], root / "serial")
    parallel = start_runs(2, [{"name": "tp2run", "argv": model_args(train_data, ITERS) + [
        "--tensor_model_parallel_size", "2", "--load", str(split),
        "--save", str(root / "tp2run")]}], root / "parallel")
    return {"root": root, **parallel.wait(), **serial.wait()}


def tensors(path) -> dict:
    reader = UnshardedReader(str(path))
    return {name: reader.view(name).clone() for name in reader.names()}


def test_merged_then_split_checkpoint_resumes_on_the_same_curve(straight, resharded_runs):
    root = resharded_runs["root"]
    want = train_metrics(straight)[3:]
    # the unsharded merge itself resumes (optimizer, schedule and data position included)
    assert resharded_runs["from_merged"].returncode == 0
    assert_same_curve(train_metrics(root / "from_merged"), want)
    # and so does the split one, at TP=2
    assert resharded_runs["tp2run"].returncode == 0
    assert_same_curve(train_metrics(root / "tp2run"), want)


def test_round_trips_are_bit_exact(tmp_path, train_data, straight):
    m1 = tmp_path / "m1"
    merge(ReshardConfig(load=str(straight), out=str(m1)))
    first = tensors(m1)
    assert any(name.startswith("optimizer.state.exp_avg.") for name in first)
    run_tool("checkpoint_util.py", "split", "--load", str(m1), "--out", str(tmp_path / "dist"),
             "--target_tp", "2", "--target_pp", "2")
    merge(ReshardConfig(load=str(tmp_path / "dist"), out=str(tmp_path / "m2")))
    second = tensors(tmp_path / "m2")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    common1 = UnshardedReader(str(m1)).common()
    common2 = UnshardedReader(str(tmp_path / "m2")).common()
    assert common1["common"]["scheduler"] == common2["common"]["scheduler"]
    assert common1["common"]["consumed_samples"] == common2["common"]["consumed_samples"]
    # legacy Megatron-LLM per-rank layout at TP=2 x PP=2, and back
    legacy = tmp_path / "legacy"
    run_tool("checkpoint_util.py", "split", "--load", str(m1), "--out", str(legacy),
             "--format", "legacy", "--target_tp", "2", "--target_pp", "2")
    assert (legacy / "iter_0000006" / "mp_rank_01_001" / "model_optim_rng.pt").exists()
    merge(ReshardConfig(load=str(legacy), out=str(tmp_path / "m3")))
    third = tensors(tmp_path / "m3")
    model_names = [k for k in first if not k.startswith("optimizer.")]
    assert sorted(third) == sorted(model_names)
    assert all(torch.equal(first[k], third[k]) for k in model_names)
    # a legacy TP=2 checkpoint loads (here at TP=2) and gives the trained model's logits
    torch.manual_seed(3)
    tokens = torch.randint(0, 1500, (2, 24))
    want = checkpoint_logits(straight, tokens, tmp_path)
    got = checkpoint_logits(legacy, tokens, tmp_path, tp=2)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_weights_only_merge_needs_finetune(resharded_runs):
    result = resharded_runs["weights"]  # a weights-only merge (--no_optimizer) as --load
    assert result.returncode != 0 and "--finetune" in result.log
    # (starting from an unsharded checkpoint with --finetune: tests/tools/test_hf_export.py)
