"""tools/checkpoint_util.py: merge / split round trips, resume after resharding, legacy layout."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.checkpointing.reshard import ReshardConfig, merge
from megatron_ext.checkpointing.unsharded import UnshardedReader
from tests.tools.test_hf_conversion import checkpoint_logits, run_tool
from tests.training.conftest import model_args, torchrun, train_metrics
from tests.training.test_parallel import assert_same_curve

pytestmark = pytest.mark.slow
ITERS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_data):
    """6 iterations at TP=1 with checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    torchrun(1, model_args(train_data, ITERS) + ["--save", str(out), "--save_interval", "3"])
    return out


def tensors(path) -> dict:
    reader = UnshardedReader(str(path))
    return {name: reader.view(name).clone() for name in reader.names()}


def test_merged_then_split_checkpoint_resumes_on_the_same_curve(tmp_path, train_data, straight):
    merged, split = tmp_path / "merged", tmp_path / "tp2"
    run_tool("checkpoint_util.py", "merge", "--load", str(straight), "--iteration", "3",
             "--out", str(merged))
    run_tool("checkpoint_util.py", "split", "--load", str(merged), "--out", str(split),
             "--target_tp", "2")
    want = train_metrics(straight)[3:]
    # the unsharded merge itself resumes (optimizer, schedule and data position included)
    torchrun(1, model_args(train_data, ITERS) + ["--load", str(merged), "--save",
                                                 str(tmp_path / "from_merged")])
    assert_same_curve(train_metrics(tmp_path / "from_merged"), want)
    # and so does the split one, at TP=2
    torchrun(2, model_args(train_data, ITERS) + ["--tensor_model_parallel_size", "2", "--load",
                                                 str(split), "--save", str(tmp_path / "tp2run")])
    assert_same_curve(train_metrics(tmp_path / "tp2run"), want)


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


def test_weights_only_merge_needs_finetune(tmp_path, train_data, straight):
    merged = tmp_path / "weights"
    run_tool("checkpoint_util.py", "merge", "--load", str(straight), "--out", str(merged),
             "--no_optimizer")
    result = torchrun(1, model_args(train_data, ITERS) + ["--load", str(merged), "--save",
                                                          str(tmp_path / "run")], check=False)
    assert result.returncode != 0 and "--finetune" in result.stderr
    # (starting from an unsharded checkpoint with --finetune: tests/tools/test_hf_export.py)
