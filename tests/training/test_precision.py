"""bf16 and fp16 mixed precision, the distributed optimizer and overlapped communication,
under real torchrun on gloo (CPU), and their checkpoints across layouts.

Every run of a world size is in one shared batch (tests/runs.py), 6 tiny iterations each:
the 2-process batch, the 4-process batch and the one-process fp16 runs start early; the
resumes of their checkpoints follow in one batch per world size.

Tolerances. fp32 with the distributed optimizer computes what the plain optimizer does
(a reduce-scatter and an all-gather instead of an all-reduce): losses, grad norms and
weights agree to 1e-6 relative. bf16 keeps 8 significant bits: each weight and
activation is off by up to 2^-9 relative (half bf16's spacing), the loss is an fp32 mean
of thousands of fp32 cross-entropies of bf16 logits, so its errors partly cancel; over
6 steps of Adam the bf16 losses stay within 2^-8 (3.9e-3) relative of fp32's (measured:
about 1e-4) and the grad norms, sums of squares of bf16-computed gradients, within 3e-2.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.runs import (
    ITERS,
    call_job,
    model_args,
    run_many,
    start_runs,
    started,
    starts_early,
    train_metrics,
)

pytestmark = pytest.mark.slow

BF16_LOSS_RTOL = 2.0 ** -8
BF16_GRAD_NORM_RTOL = 3e-2
EXACT = 1e-6
# the distributed optimizer's grad norm sums squares per shard, then over the ranks: another
# order of fp32 additions than the plain optimizer's (measured: up to 1.1e-6 relative)
GRAD_NORM_RTOL = 1e-5
DIST = ["--use_distributed_optimizer"]

TWO = {
    "dist-dp2": DIST,
    "overlap-dp2": DIST + ["--overlap_grad_reduce", "--overlap_param_gather"],
    "overlap-plain-dp2": ["--overlap_grad_reduce"],
    "bf16-dp2": ["--bf16", "--save_interval", "3"],
    "bf16-dist-dp2": ["--bf16"] + DIST,
    "bf16-tp2": ["--bf16", "--tensor_model_parallel_size", "2"],
    # the distributed optimizer with packing, context and sequence parallelism: on the
    # serial run's curve (packed: the packed one's); at CP=2 it shards over the DP x CP
    # group (2 ranks), at TP=2 with SP over a one-rank DP group
    "dist-dp2-packed": DIST + ["--pack_sequences"],
    "dist-cp2-packed": DIST + ["--context_parallel_size", "2", "--pack_sequences"],
    "dist-tp2-sp": DIST + ["--tensor_model_parallel_size", "2", "--sequence_parallel"],
}
FOUR = {
    "dist-dp2tp2": DIST + ["--tensor_model_parallel_size", "2", "--save_interval", "3"],
    "plain-dp2tp2": ["--tensor_model_parallel_size", "2"],
    "dist-dp2pp2": DIST + ["--pipeline_model_parallel_size", "2"],
    "plain-dp2pp2": ["--pipeline_model_parallel_size", "2"],
}
OVERFLOW_SCALE = 2 ** 23  # fp16 gradients overflow at 2^23 .. 2^20 on this data
ONE = {
    # a huge initial scale: steps overflow (skipped) until halving brings it down
    "fp16-overflow": ["--fp16", "--initial_loss_scale", str(OVERFLOW_SCALE), "--hysteresis",
                      "1"],
    "fp16": ["--fp16", "--loss_scale", "1024"],
}


@starts_early("precision_runs")
def start_precision_runs(request):
    root = request.getfixturevalue("tmp_path_factory").mktemp("precision")
    data = request.getfixturevalue("train_data")

    def runs(table):
        return [{"name": name, "argv": model_args(data, ITERS) + flags
                 + ["--save", str(root / name)]} for name, flags in table.items()]

    dtypes = [call_job(f"dtypes-{name}", "tests.training.check_precision:main",
                       model_args(data, 1) + flags)
              for name, flags in {"bf16": ["--bf16"], "bf16-dist": ["--bf16"] + DIST,
                                  "fp32-dist": DIST}.items()]
    return root, {"2": start_runs(2, runs(TWO) + dtypes, root / "two", early=True),
                  "4": start_runs(4, runs(FOUR), root / "four", early=True),
                  "1": start_runs(1, runs(ONE), root / "one", early=True)}


@pytest.fixture(scope="module")
def precision_runs(request) -> tuple[Path, dict]:
    root, launches = started("precision_runs", request)
    results = {name: result for launch in launches.values()
               for name, result in launch.wait().items()}
    failed = {name: r.log[-3000:] for name, r in results.items() if r.returncode}
    assert not failed, failed
    return root, results


def stopped_at_3(run: Path, copy: Path) -> Path:
    """A copy of ``run`` as if it had stopped after saving iteration 3."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / f"iter_{ITERS:07d}")
    (copy / "latest_checkpointed_iteration.txt").write_text("3\n")
    return copy


@pytest.fixture(scope="module")
def resumed_runs(precision_runs, train_data, reference_run) -> dict:
    """The checkpoints of iteration 3 resumed: the distributed optimizer's DP=2 x TP=2 one
    at DP=1, DP=4 and TP=2 x PP=2, the bf16 one at DP=1; the fp32 reference finetuned in
    bf16, and resumed with the distributed optimizer (refused)."""
    root, _ = precision_runs
    resumed = root / "resumed"
    resumed.mkdir()
    layouts = {"dp1": [], "dp4": [],
               "tp2pp2": ["--tensor_model_parallel_size", "2",
                          "--pipeline_model_parallel_size", "2"]}
    for layout in layouts:
        stopped_at_3(root / "dist-dp2tp2", resumed / f"dist-{layout}")
    stopped_at_3(root / "bf16-dp2", resumed / "bf16-dp1")

    def resume(name, *flags):
        return {"name": name, "argv": model_args(train_data, ITERS) + list(flags) + [
            "--load", str(resumed / name), "--save", str(resumed / name)]}

    serial = [resume("dist-dp1", *DIST), resume("bf16-dp1", "--bf16"),
              {"name": "bf16-from-fp32", "argv": model_args(train_data, 2) + [
                  "--bf16", "--load", str(reference_run), "--finetune",
                  "--save", str(resumed / "bf16-from-fp32")]},
              {"name": "plain-to-dist", "argv": model_args(train_data, ITERS) + DIST + [
                  "--load", str(reference_run)]}]
    four = start_runs(4, [resume(f"dist-{layout}", *DIST, *flags)
                          for layout, flags in layouts.items() if layout != "dp1"],
                      resumed / "four")
    results = run_many(1, serial, resumed / "one")
    results.update(four.wait())
    return {"root": resumed, **results}


def assert_curves(got: list[dict], want: list[dict], loss_rtol: float, grad_rtol: float):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=loss_rtol), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=grad_rtol), (g, w)
        assert g["consumed_samples"] == w["consumed_samples"]


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint in its global shape (torch's DCP reader: any
    layout), weights and optimizer state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = directory.parent / f"{directory.parent.name}-{directory.name}.pt"
    if not target.exists():
        dcp_to_torch_save(str(directory), str(target))
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


MAIN_PARAM = "optimizer.state.param."  # the distributed optimizer's copy of the weights


def assert_same_tensors(got: Path, want: Path, rtol: float) -> None:
    """Weights and Adam's moments agree; a distributed optimizer's saved main weights
    (``optimizer.state.param.*``, absent from the plain optimizer's fp32 checkpoints)
    agree with the other's weights."""
    a, b = checkpoint_tensors(got), checkpoint_tensors(want)
    weights = [k for k in b if not k.startswith("optimizer.")]
    assert weights and any(k.startswith("optimizer.state.exp_avg") for k in b)
    assert set(b) <= set(a) and all(k.startswith(MAIN_PARAM) for k in set(a) - set(b))
    for key in a:  # relative to the tensor's norm: Adam moves rarely seen embedding rows
        other = b[key] if key in b else b[key[len(MAIN_PARAM):]]  # by a few fp32 ulps
        # Adam's moments are (squares of) gradients: their differences, 10x the weights'
        tolerance = rtol * (10 if key.startswith("optimizer.state.exp_avg") else 1)
        assert float((a[key] - other).norm()) <= tolerance * max(float(other.norm()), 1e-12), key


@pytest.mark.parametrize("run,plain", [("dist-dp2", None), ("dist-dp2tp2", "plain-dp2tp2"),
                                       ("dist-dp2pp2", "plain-dp2pp2")])
def test_distributed_optimizer_equals_the_plain_one(precision_runs, reference_run, reference,
                                                    run, plain):
    """fp32: sharding Adam's state over DP=2 changes nothing (DP=2 alone equals the serial
    run; with TP or PP it is compared with the plain optimizer at the same layout)."""
    root, _ = precision_runs
    want_run = reference_run if plain is None else root / plain
    assert_curves(train_metrics(root / run), train_metrics(want_run), EXACT, GRAD_NORM_RTOL)
    assert_same_tensors(root / run / f"iter_{ITERS:07d}", want_run / f"iter_{ITERS:07d}",
                        EXACT)


@pytest.mark.parametrize("run,packed,rtol", [("dist-dp2-packed", True, EXACT),
                                             ("dist-cp2-packed", True, EXACT),
                                             ("dist-tp2-sp", False, 2e-5)])
def test_distributed_optimizer_with_packing_cp_and_sp(precision_runs, request, run, packed,
                                                      rtol):
    """The distributed optimizer beside packed rows, context parallelism and sequence
    parallelism: the serial run's curve (the packed serial run's when packed), to the
    bounds those layouts meet with the plain optimizer (tests/training/
    test_context_parallel.py, test_parallel.py)."""
    root, _ = precision_runs
    want = request.getfixturevalue("packed_reference" if packed else "reference")
    assert_curves(train_metrics(root / run), want, rtol, max(rtol, GRAD_NORM_RTOL)
                  if packed else 1e-3)


def test_overlapped_communication_changes_nothing(precision_runs, reference):
    root, _ = precision_runs
    assert_curves(train_metrics(root / "overlap-dp2"), train_metrics(root / "dist-dp2"), EXACT,
                  GRAD_NORM_RTOL)
    assert_curves(train_metrics(root / "overlap-plain-dp2"), reference, EXACT, EXACT)
    assert_same_tensors(root / "overlap-dp2" / f"iter_{ITERS:07d}",
                        root / "dist-dp2" / f"iter_{ITERS:07d}", EXACT)


@pytest.mark.parametrize("run", ["bf16-dp2", "bf16-tp2", "bf16-dist-dp2"])
def test_bf16_tracks_fp32(precision_runs, reference, run):
    root, _ = precision_runs
    got = train_metrics(root / run)
    assert_curves(got, reference, BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL)
    assert got != reference and any(g["loss"] != w["loss"] for g, w in zip(got, reference))


def test_bf16_with_the_distributed_optimizer_equals_bf16_without(precision_runs):
    """The same bf16 model and fp32 main weights, losses to 1e-4 relative (40x tighter than
    bf16 against fp32), grad norms to 1e-3: the gradients are reduce-scattered instead of all-reduced (another fp32
    summation order), so an fp32 main weight may differ in its last bit and round to the
    neighbouring bf16 value, and Adam grows such flips over the steps (measured over 6
    steps: losses up to 1.5e-5, grad norms up to 1.2e-4 apart; bf16 vs fp32: 1e-4, 3e-3)."""
    root, _ = precision_runs
    assert_curves(train_metrics(root / "bf16-dist-dp2"), train_metrics(root / "bf16-dp2"),
                  1e-4, 1e-3)


def test_bf16_keeps_fp32_main_weights_and_an_fp32_loss(precision_runs):
    """The model in bf16; megatron-core's mixed-precision optimizers (plain and
    distributed) update fp32 copies with fp32 gradients; the loss and its report fp32."""
    _, results = precision_runs
    seen = {name: json.loads(results[f"dtypes-{name}"].stdout.strip().splitlines()[-1])
            for name in ("bf16", "bf16-dist", "fp32-dist")}
    for name in ("bf16", "bf16-dist"):
        got = seen[name]
        assert got["model_params"] == ["bfloat16"], got
        assert got["main_params"] == ["float32"] and got["main_grads"] == ["float32"], got
        assert got["grad_buffers"] == ["float32"] and got["loss"] == got["report"] == "float32"
    assert seen["bf16"]["optimizer"] == "Float16OptimizerWithFloat16Params"
    assert seen["bf16"]["main_param_numel"] == seen["bf16"]["model_param_numel"]
    # DP=2: each rank's optimizer holds half of the main weights
    assert seen["bf16-dist"]["optimizer"] == seen["fp32-dist"]["optimizer"] == \
        "DistributedOptimizer"
    half, total = seen["bf16-dist"]["main_param_numel"], seen["bf16"]["model_param_numel"]
    assert total // 2 <= half <= total // 2 + total // 100  # + the buffers' padding
    assert seen["fp32-dist"]["model_params"] == ["float32"]


def test_fp16_overflow_skips_steps_and_lowers_the_scale(precision_runs, reference):
    root, results = precision_runs
    got = train_metrics(root / "fp16-overflow")
    skipped = [r["iteration"] for r in got if r["skipped"]]
    # the first steps overflow; each halves the scale (--hysteresis 1); then none
    assert skipped == [1, 2, 3, 4], [(r["iteration"], r["loss_scale"]) for r in got]
    assert [r["loss_scale"] for r in got] == [OVERFLOW_SCALE / 2 ** min(i, 4)
                                              for i in range(1, ITERS + 1)]
    assert all(math.isnan(float(r["grad_norm"])) for r in got[:4])  # no update
    assert [r["skipped_steps"] for r in got] == [1, 2, 3, 4, 4, 4]
    assert [r["lr"] for r in got[:5]] == [0.0] * 5  # the schedule waits for a real step
    assert got[5]["lr"] == reference[1]["lr"]
    log = results["fp16-overflow"].log
    assert log.count("step skipped (inf/nan gradients") == 4
    assert "4 of 6 steps skipped (inf/nan gradients); loss scale now 524288" in log
    # a static scale that does not overflow: fp16 tracks fp32 (10 significant bits)
    static = train_metrics(root / "fp16")
    assert not any(r["skipped"] for r in static) and {r["loss_scale"] for r in static} == {1024}
    assert_curves(static, reference, 2.0 ** -10, 1e-2)


@pytest.mark.parametrize("layout", ["dp1", "dp4", "tp2pp2"])
def test_distributed_optimizer_checkpoint_resumes_at_another_layout(precision_runs,
                                                                    resumed_runs, layout):
    """Saved at DP=2 x TP=2 (megatron-core's layout-independent "fully_reshardable"
    model-space form), resumed at DP=1, DP=4 and TP=2 x PP=2: the straight run's curve."""
    root, _ = precision_runs
    result = resumed_runs[f"dist-{layout}"]
    assert result.returncode == 0, result.log[-3000:]
    assert "resuming at iteration 3" in result.log
    assert_curves(train_metrics(resumed_runs["root"] / f"dist-{layout}"),
                  train_metrics(root / "dist-dp2tp2"), EXACT, 1e-5)


def test_bf16_checkpoint_resumes_on_its_own_curve(precision_runs, resumed_runs):
    root, _ = precision_runs
    assert resumed_runs["bf16-dp1"].returncode == 0, resumed_runs["bf16-dp1"].log[-3000:]
    assert_curves(train_metrics(resumed_runs["root"] / "bf16-dp1"),
                  train_metrics(root / "bf16-dp2"), EXACT, 1e-5)


def test_precision_and_optimizer_changes_convert_or_are_refused(resumed_runs, reference):
    """fp32 weights finetuned in bf16 (converted: a fresh bf16 optimizer from them);
    resuming plain optimizer state with the distributed optimizer is refused."""
    tuned = resumed_runs["bf16-from-fp32"]
    assert tuned.returncode == 0, tuned.log[-3000:]
    metrics = train_metrics(resumed_runs["root"] / "bf16-from-fp32")
    assert [r["iteration"] for r in metrics] == [1, 2]
    assert metrics[0]["loss"] < reference[0]["loss"] - 0.1  # from the trained weights
    refused = resumed_runs["plain-to-dist"]
    assert refused.returncode == 1
    assert "optimizer: checkpoint plain, this run distributed" in refused.log
    assert "--finetune" in refused.log
