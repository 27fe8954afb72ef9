"""Context parallelism on real torchrun (gloo): CP=2, alone and with TP/SP, PP, packing,
GQA (the tiny model: 4 heads, 2 key/value heads), a sliding window and learned positions,
on the serial run's curve; checkpoints cross between CP=1 and CP=2 in both directions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.runs import ITERS, model_args, start_runs, started, starts_early, train_metrics
from tests.training.test_parallel import assert_same_curve

pytestmark = pytest.mark.slow
CP2 = ["--context_parallel_size", "2"]
LAYOUTS = {  # name: (processes, flags); on the reference run's curve (packed: the packed one's)
    "cp2": (2, CP2 + ["--save_interval", "3"]),  # its iteration 3 resumes at CP=1
    "cp2-packed": (2, CP2 + ["--pack_sequences"]),
    "tp2-cp2-sp": (4, CP2 + ["--tensor_model_parallel_size", "2", "--sequence_parallel"]),
    "pp2-cp2-packed": (4, CP2 + ["--pipeline_model_parallel_size", "2", "--pack_sequences"]),
}
FAMILIES = {  # each at CP=2 (packed) against its own serial packed run
    "mistral": ["--model_name", "mistral", "--sliding_window_size", "16"],  # window < rows
    "gpt": ["--model_name", "gpt"],  # learned absolute positions, LayerNorm, biases
    "qwen2": ["--model_name", "qwen2"],  # q/k/v biases, RoPE base 1e6
    "qwen3": ["--model_name", "qwen3", "--kv_channels", "32"],  # q/k norms, head size 32
    # windowed and global layers, two RoPE bases, one key/value head
    "gemma3": ["--model_name", "gemma3", "--num_attention_heads_kv", "1", "--kv_channels",
               "32", "--sliding_window_size", "16", "--sliding_window_pattern", "2"],
}


@starts_early("cp_runs")
def start_cp_runs(request):
    """One batch per world size: the CP=2 runs, the 4-process ones, the families' serial
    references."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("context_parallel")
    data = request.getfixturevalue("train_data")

    def run(name, flags):
        return {"name": name, "argv": model_args(data, ITERS) + flags + [
            "--save", str(root / name)]}

    batches = {1: [], 2: [], 4: []}
    for name, (nproc, flags) in LAYOUTS.items():
        batches[nproc].append(run(name, flags))
    for family, flags in FAMILIES.items():
        batches[1].append(run(f"{family}-ref", flags + ["--pack_sequences"]))
        batches[2].append(run(f"{family}-cp2", flags + CP2 + ["--pack_sequences"]))
    launches = [start_runs(nproc, runs, root / f"launch{nproc}", early=True)
                for nproc, runs in batches.items()]
    return root, launches


@pytest.fixture(scope="module")
def cp_runs(request) -> Path:
    root, launches = started("cp_runs", request)
    results = {name: r for launch in launches for name, r in launch.wait().items()}
    failed = {name: r.log[-3000:] for name, r in results.items() if r.returncode}
    assert not failed, failed
    return root


def _stopped_at_3(run: Path, copy: Path) -> Path:
    """A copy of ``run`` as if it had stopped after its iteration-3 checkpoint."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / f"iter_{ITERS:07d}")
    (copy / "latest_checkpointed_iteration.txt").write_text("3\n")
    return copy


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, train_data, reference_run, cp_runs) -> dict:
    """The serial reference resumed at CP=2 from its iteration 3, and the CP=2 run resumed
    at CP=1 from its iteration 3 (two batches, side by side)."""
    root = tmp_path_factory.mktemp("cp_resume")
    runs = {"cp1-to-cp2": (2, _stopped_at_3(reference_run, root / "cp1-to-cp2"), CP2),
            "cp2-to-cp1": (1, _stopped_at_3(cp_runs / "cp2", root / "cp2-to-cp1"), [])}
    launches = [start_runs(nproc, [{"name": name, "argv": model_args(train_data, ITERS) + flags
                                    + ["--load", str(run), "--save", str(run)]}],
                           root / f"launch-{name}")
                for name, (nproc, run, flags) in runs.items()]
    results = {name: r for launch in launches for name, r in launch.wait().items()}
    return {name: (runs[name][1], result) for name, result in results.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_single_process(cp_runs, request, layout):
    run = cp_runs / layout
    packed = "--pack_sequences" in LAYOUTS[layout][1]  # a sample is a packed row
    reference = request.getfixturevalue("packed_reference" if packed else "reference")
    assert_same_curve(train_metrics(run), reference, rtol=1e-6 if packed else 2e-5)
    if "--save_interval" not in LAYOUTS[layout][1]:  # (a checkpoint at the end skips it)
        assert train_metrics(run, "valid")  # evaluation runs at CP=2 too
    saved = json.loads((run / f"iter_{ITERS:07d}" / "run_config.json").read_text())
    assert saved["parallel"]["context_parallel_size"] == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_at_cp2_match_their_serial_run(cp_runs, family):
    assert_same_curve(train_metrics(cp_runs / f"{family}-cp2"),
                      train_metrics(cp_runs / f"{family}-ref"))


@pytest.mark.parametrize("name", ["cp1-to-cp2", "cp2-to-cp1"])
def test_checkpoints_resume_across_context_parallel_sizes(resumed, reference, name):
    run, result = resumed[name]
    assert result.returncode == 0, result.log[-3000:]
    assert "resuming at iteration 3" in result.log
    assert "RNG state not restored" in result.log  # RNG streams belong to a layout
    assert_same_curve(train_metrics(run), reference)
