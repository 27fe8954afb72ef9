"""tools/checkpoint_util.py: merge / split round trips, resume after resharding, legacy layout."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.checkpointing.reshard import ReshardConfig, merge
from megatron_ext.checkpointing.unsharded import UnshardedReader
from tests.runs import ITERS, job_logits, logits_job, model_args, start_runs, train_metrics
from tests.tools.test_hf_conversion import finish_tool, start_tool, tool_main
from tests.training.test_parallel import assert_same_curve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(reference_run):
    """6 iterations at TP=1 with checkpoints at 3 and 6: the shared reference run."""
    return reference_run


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory, train_data, straight):
    """Every resharded checkpoint of this module, then every run on them in two batches
    side by side: training from the merge at 3 (one process), from its TP=2 split (two)
    and from a weights-only merge; the logits of the reference run at TP=1 and of its
    legacy TP=2 x PP=2 split at TP=2. The two dist splits need a process group: the TP=2
    one is the tool's command line (its smoke test), the TP=2 x PP=2 one the tool's main
    in the one-process batch; the rest runs in-process."""
    root = tmp_path_factory.mktemp("resharded")
    merged, split, weights = root / "merged", root / "tp2", root / "weights"
    m1, dist, legacy = root / "m1", root / "dist", root / "legacy"
    merge(ReshardConfig(load=str(straight), out=str(merged), iteration=3))
    cli = start_tool("checkpoint_util.py", "split", "--load", str(merged), "--out", str(split),
                     "--target_tp", "2")
    merge(ReshardConfig(load=str(straight), out=str(m1)))
    tool = tool_main("checkpoint_util.py")
    tool(["merge", "--load", str(straight), "--out", str(weights), "--no_optimizer"])
    # legacy Megatron-LLM per-rank layout at TP=2 x PP=2 (written without a process group)
    tool(["split", "--load", str(m1), "--out", str(legacy), "--format", "legacy",
          "--target_tp", "2", "--target_pp", "2"])
    torch.manual_seed(3)
    tokens = torch.randint(0, 1500, (2, 24))
    want = logits_job("straight_logits", straight, tokens, root / "logits")
    got = logits_job("legacy_logits", legacy, tokens, root / "logits", tp=2)
    serial = start_runs(1, [
        {"name": "dist_split", "tool": "checkpoint_util.py", "argv": [  # no --no_progress
            "split", "--load", str(m1), "--out", str(dist), "--target_tp", "2",
            "--target_pp", "2"]},
        {"name": "from_merged", "argv": model_args(train_data, ITERS) + [
            "--load", str(merged), "--save", str(root / "from_merged")]},
        {"name": "weights", "argv": model_args(train_data, ITERS) + [
            "--load", str(weights), "--save", str(root / "run")]},
        want,
    ], root / "serial")
    finish_tool(cli)
    parallel = start_runs(2, [{"name": "tp2run", "argv": model_args(train_data, ITERS) + [
        "--tensor_model_parallel_size", "2", "--load", str(split),
        "--save", str(root / "tp2run")]}, got], root / "parallel")
    results = {**parallel.wait(), **serial.wait()}
    assert results["dist_split"].returncode == 0, results["dist_split"].log[-3000:]
    return {"root": root, "m1": m1, "dist": dist, "legacy": legacy,
            "logits": (job_logits(results, want), job_logits(results, got)), **results}


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


def test_round_trips_are_bit_exact(tmp_path, resharded_runs):
    m1 = resharded_runs["m1"]  # the reference run merged
    first = tensors(m1)
    assert any(name.startswith("optimizer.state.exp_avg.") for name in first)
    # split at TP=2 x PP=2 (in the fixture) and merged back
    merge(ReshardConfig(load=str(resharded_runs["dist"]), out=str(tmp_path / "m2")))
    second = tensors(tmp_path / "m2")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    common1 = UnshardedReader(str(m1)).common()
    common2 = UnshardedReader(str(tmp_path / "m2")).common()
    assert common1["common"]["scheduler"] == common2["common"]["scheduler"]
    assert common1["common"]["consumed_samples"] == common2["common"]["consumed_samples"]
    # legacy Megatron-LLM per-rank layout at TP=2 x PP=2, and back
    legacy = resharded_runs["legacy"]
    assert (legacy / "iter_0000006" / "mp_rank_01_001" / "model_optim_rng.pt").exists()
    merge(ReshardConfig(load=str(legacy), out=str(tmp_path / "m3")))
    third = tensors(tmp_path / "m3")
    model_names = [k for k in first if not k.startswith("optimizer.")]
    assert sorted(third) == sorted(model_names)
    assert all(torch.equal(first[k], third[k]) for k in model_names)
    # a legacy TP=2 checkpoint loads (here at TP=2) and gives the trained model's logits
    want, got = resharded_runs["logits"]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_weights_only_merge_needs_finetune(resharded_runs):
    result = resharded_runs["weights"]  # a weights-only merge (--no_optimizer) as --load
    assert result.returncode != 0 and "--finetune" in result.log
    # (starting from an unsharded checkpoint with --finetune: tests/tools/test_hf_export.py)
