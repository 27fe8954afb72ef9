"""LoRA and DoRA on gloo: TP/SP/PP/DP runs equal the one-process run, adapter-only
checkpoints, exact resume, and the refusals (another base, other adapter settings)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.runs import (
    ITERS,
    model_args,
    start_runs,
    started,
    starts_early,
    train_metrics,
)
from tests.training.test_parallel import LAYOUTS, assert_same_curve

pytestmark = pytest.mark.slow

PARALLEL = {name: flags for name, flags in LAYOUTS.items() if name != "dp2"}  # TP, TP+SP, PP
BF16_DIST = ["--bf16", "--use_distributed_optimizer"]  # at DP=2


def peft_args(train_data: dict, base: Path, method: str, save: Path, iters: int = ITERS):
    return model_args(train_data, iters) + ["--load", str(base), "--peft", method,
                                            "--save", str(save)]


@starts_early("peft_runs")
def start_peft_runs(request):
    """The one-process LoRA and DoRA runs on the reference checkpoint, and the same at TP=2
    (with and without SP), PP=2 and (LoRA) DP=2; a LoRA run stopped at 3 then relaunched
    with the same command, then launched again on another base."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("peft")
    data = request.getfixturevalue("train_data")
    base = request.getfixturevalue("reference_run")
    other = root / "other-base"  # the reference run's iteration 3: same shape, other weights
    shutil.copytree(base, other)
    shutil.rmtree(other / "iter_0000006")
    (other / "latest_checkpointed_iteration.txt").write_text("3\n")
    parallel = [{"name": f"{method}-{layout}", "argv": peft_args(
        data, base, method, root / f"{method}-{layout}") + flags}
        for method in ("lora", "dora") for layout, flags in PARALLEL.items()]
    parallel.append({"name": "lora-dp2", "argv": peft_args(data, base, "lora",
                                                           root / "lora-dp2")})
    parallel.append({"name": "dora-cp2", "argv": peft_args(data, base, "dora",
                                                           root / "dora-cp2")
                     + ["--context_parallel_size", "2"]})
    parallel += [{"name": f"{method}-bf16-dist", "argv": peft_args(
        data, base, method, root / f"{method}-bf16-dist") + BF16_DIST}
        for method in ("lora", "dora")]
    stopped = peft_args(data, base, "lora", root / "lora-resumed")
    serial = [
        {"name": "lora", "argv": peft_args(data, base, "lora", root / "lora")},
        {"name": "dora", "argv": peft_args(data, base, "dora", root / "dora")},
        {"name": "dora-recompute", "argv": peft_args(data, base, "dora", root / "dora-recompute")
         + ["--recompute_granularity", "full"]},
        {"name": "lora-exit3", "argv": stopped + ["--exit_interval", "3"]},
        {"name": "lora-resume", "argv": stopped},
        {"name": "wrong-base", "argv": peft_args(data, other, "lora", root / "lora-resumed")},
        {"name": "other-settings", "argv": stopped + ["--peft_dim", "8"]},
        # --load of the adapter checkpoint itself: its recorded base, its adapters, two
        # more steps into another --save
        {"name": "from-adapters", "argv": model_args(data, ITERS + 2) + [
            "--load", str(root / "lora"), "--save", str(root / "from-adapters")]},
    ]
    return root, start_runs(1, serial, root / "serial", early=True), start_runs(
        2, parallel, root / "parallel", early=True)


@pytest.fixture(scope="module")
def peft_runs(request):
    root, serial, parallel = started("peft_runs", request)
    results = {**serial.wait(), **parallel.wait()}
    return root, results


def adapter_tensors(run: Path, iteration: int = ITERS) -> dict[str, torch.Tensor]:
    from megatron_ext.checkpointing.sources import adapter_tensors as read

    return read(str(run / f"iter_{iteration:07d}"))


def ok(results, name):
    result = results[name]
    assert result.returncode == 0, result.log[-4000:]
    return result


@pytest.mark.parametrize("method,layout", [
    (method, layout) for method in ("lora", "dora") for layout in PARALLEL] + [
    ("lora", "dp2"), ("dora", "recompute"), ("dora", "cp2")])
def test_parallel_adapters_match_one_process(peft_runs, method, layout):
    root, results = peft_runs
    name = f"{method}-{layout}"
    ok(results, method)
    ok(results, name)
    assert_same_curve(train_metrics(root / name), train_metrics(root / method))
    want, got = adapter_tensors(root / method), adapter_tensors(root / name)
    assert sorted(got) == sorted(want)
    for key in want:  # the adapters after 6 steps: their gradients agreed at every step
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_checkpoint_holds_adapters_only(peft_runs, reference_run, method):
    from megatron_ext.checkpointing.adapters import content_identity
    from megatron_ext.checkpointing.run_config import load_run_config

    root, results = peft_runs
    log = ok(results, method).log
    assert f"{method}: 8 adapted linear layers" in log and "trainable" in log
    tensors = adapter_tensors(root / method)
    assert tensors and all(".adapter." in name for name in tensors)
    # the optimizer holds state for the adapters only (Adam's two moments each)
    from megatron_ext.checkpointing.unsharded import iter_dist_checkpoint

    saved = [name for group in iter_dist_checkpoint(str(root / method / "iter_0000006"))
             for name in group]
    moments = [name for name in saved if name.startswith("optimizer.")]
    assert moments and all(".adapter." in name for name in moments)
    assert len(moments) == 2 * len(tensors)
    suffixes = {name.rsplit(".", 1)[-1] for name in tensors}
    assert suffixes == ({"lora_A", "lora_B", "magnitude"} if method == "dora"
                        else {"lora_A", "lora_B"})
    # r 16 on the fused q/k/v (64 -> 128 rows: 4 query heads and 2 key/value heads of 16)
    assert tensors["decoder.layers.0.self_attention.linear_qkv.adapter.lora_A"].shape == (16, 64)
    assert tensors["decoder.layers.0.self_attention.linear_qkv.adapter.lora_B"].shape == (128, 16)
    # B moved away from zero: the adapters trained
    assert tensors["decoder.layers.1.mlp.linear_fc2.adapter.lora_B"].abs().max() > 0
    run_config = load_run_config(str(root / method / "iter_0000006"))
    assert run_config["peft"]["peft"] == method and run_config["peft"]["dim"] == 16
    base = run_config["base"]
    assert base["checkpoint"] == str(reference_run)
    assert base["identity"] == content_identity(str(reference_run / "iter_0000006"))
    # the whole checkpoint is a small fraction of the base's size
    size = sum(f.stat().st_size for f in (root / method).rglob("*") if f.is_file())
    base_size = sum(f.stat().st_size for f in (reference_run / "iter_0000006").rglob("*")
                    if f.is_file())
    assert size < 0.5 * base_size


def test_stopped_lora_run_resumes_on_the_same_curve(peft_runs):
    root, results = peft_runs
    stopped = ok(results, "lora-exit3")
    assert "lora-resumed/iter_0000003" in stopped.log and "iter_0000004" not in stopped.log
    resumed = ok(results, "lora-resume")
    assert "resumed the adapters" in resumed.log
    assert_same_curve(train_metrics(root / "lora-resumed"), train_metrics(root / "lora"))
    want, got = adapter_tensors(root / "lora"), adapter_tensors(root / "lora-resumed")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


def test_load_of_an_adapter_checkpoint_continues_it_on_its_base(peft_runs, reference_run):
    root, results = peft_runs
    log = ok(results, "from-adapters").log
    assert f"loaded base weights from {reference_run}" in log
    assert "resumed the adapters from" in log and "(iteration 6)" in log
    assert [r["iteration"] for r in train_metrics(root / "from-adapters")] == [7, 8]
    assert sorted(adapter_tensors(root / "from-adapters", ITERS + 2)) == sorted(
        adapter_tensors(root / "lora"))


def test_resume_on_another_base_or_with_other_settings_is_refused(peft_runs):
    root, results = peft_runs
    wrong = results["wrong-base"]
    assert wrong.returncode == 1, wrong.log[-3000:]
    assert "another model" in wrong.log and "the same base" in wrong.log
    other = results["other-settings"]
    assert other.returncode == 1, other.log[-3000:]
    assert "other settings" in other.log and "dim: checkpoint 16, this run 8" in other.log
    # neither wrote anything: the run directory still ends at iteration 6
    assert (root / "lora-resumed" / "latest_checkpointed_iteration.txt").read_text().strip() \
        == "6"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_adapters_with_the_distributed_optimizer_track_fp32(peft_runs, method):
    """bf16 base and adapters, Adam's state of the adapters sharded over DP=2: the fp32
    one-process curve within bf16's tolerance (tests/training/test_precision.py), and
    the checkpoint holds the same adapter tensors, and only those."""
    from tests.training.test_precision import BF16_GRAD_NORM_RTOL, BF16_LOSS_RTOL, assert_curves

    root, results = peft_runs
    name = f"{method}-bf16-dist"
    ok(results, method)
    ok(results, name)
    assert_curves(train_metrics(root / name), train_metrics(root / method), BF16_LOSS_RTOL,
                  BF16_GRAD_NORM_RTOL)
    want, got = adapter_tensors(root / method), adapter_tensors(root / name)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=5e-2, atol=2e-3,
                                   msg=key)
