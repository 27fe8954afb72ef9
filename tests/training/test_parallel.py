"""Real torchrun on gloo: TP/PP/DP parity with one process, and exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.parallel import free_port
from tests.conftest import REPO
from tests.runs import (
    ITERS,
    RunResult,
    child_env,
    model_args,
    run_many,
    start_runs,
    started,
    starts_early,
    train_metrics,
)

pytestmark = pytest.mark.slow
LAYOUTS = {
    "tp2": ["--tensor_model_parallel_size", "2"],
    "tp2-sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel"],
    "pp2": ["--pipeline_model_parallel_size", "2"],
    "dp2": [],
}


@starts_early("parallel_runs")
def start_parallel_runs(request):
    """Every 2-process run of this module in one batch (run_many.py re-initialises
    megatron-core's groups between layouts): the four layouts, and TP=2 stopped at 3."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("parallel")
    train_data = request.getfixturevalue("train_data")
    runs = [{"name": name, "argv": model_args(train_data, ITERS) + layout + [
        "--save", str(root / name)]} for name, layout in LAYOUTS.items()]
    runs.append({"name": "tp2-exit3", "argv": model_args(train_data, ITERS) + [
        "--save", str(root / "tp2-exit3"), "--tensor_model_parallel_size", "2",
        "--exit_interval", "3"]})
    return root, start_runs(2, runs, root / "launch", early=True)


@pytest.fixture(scope="module")
def parallel_runs(request) -> Path:
    root, launch = started("parallel_runs", request)
    assert all(r.returncode == 0 for r in launch.wait().values())
    return root


@pytest.fixture(scope="module")
def serial_runs(tmp_path_factory, train_data, reference_run, parallel_runs) -> dict:
    """Every later one-process run of this module in one launch: resuming the TP=2 run at
    TP=1 and relaunching it when finished, finetuning from the reference, and the
    missing or corrupt checkpoints (each prepared here from a copy)."""
    import shutil

    root = tmp_path_factory.mktemp("serial")
    resumed = root / "resumed"
    shutil.copytree(parallel_runs / "tp2-exit3", resumed)
    broken = root / "broken"  # the tracker names a missing directory
    shutil.copytree(reference_run, broken)
    shutil.rmtree(broken / "iter_0000003")
    (broken / "latest_checkpointed_iteration.txt").write_text("3\n")
    truncated = root / "truncated"
    shutil.copytree(reference_run, truncated)
    for shard in (truncated / "iter_0000006").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated shard files
    args = model_args(train_data, ITERS) + ["--save", str(resumed)]
    final = str(resumed / "iter_0000006")
    errors = model_args(train_data, 2)
    runs = [
        {"name": "resume", "argv": args + ["--load", str(resumed)], "stat": [final]},
        {"name": "again", "argv": args + ["--load", str(resumed)], "stat": [final]},
        {"name": "finetune", "argv": model_args(train_data, 2) + [
            "--num_layers", "4", "--hidden_size", "32",  # ignored
            "--load", str(reference_run), "--finetune", "--use_checkpoint_args",
            "--save", str(root / "finetuned")]},
        {"name": "missing", "argv": errors + ["--load", str(root / "nothing")]},
        {"name": "broken", "argv": errors + ["--load", str(broken)]},
        {"name": "truncated", "argv": errors + ["--load", str(truncated)]},
    ]
    results = run_many(1, runs, root / "launch")
    return {"root": root, "resumed": resumed, **results}


def assert_same_curve(got, want, rtol=2e-5):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=rtol), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3)
        assert g["consumed_samples"] == w["consumed_samples"]
        assert g["consumed_tokens"] == w["consumed_tokens"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_match_single_process(parallel_runs, reference, layout):
    assert_same_curve(train_metrics(parallel_runs / layout), reference)
    assert train_metrics(parallel_runs / layout, "valid")  # validation ran at the end


def test_tp2_checkpoint_resumes_at_tp1_on_the_same_curve(parallel_runs, serial_runs, reference):
    stopped = parallel_runs / "tp2-exit3"
    assert (stopped / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list(stopped.glob("*.incomplete"))
    tmp_path = serial_runs["resumed"]  # a copy of the stopped run, resumed at TP=1
    assert serial_runs["resume"].returncode == 0, serial_runs["resume"].log[-3000:]
    assert_same_curve(train_metrics(tmp_path), reference)

    # relaunching a finished run trains nothing and leaves its checkpoint untouched
    final = tmp_path / "iter_0000006"
    stamp = serial_runs["resume"].mtimes[str(final)]
    again = serial_runs["again"]
    assert "nothing to train" in again.log
    assert again.mtimes[str(final)] == stamp
    assert len(train_metrics(tmp_path, "valid")) == 1  # no second evaluation either


# Sends SIGTERM to a process group once a metrics file has 3 lines (a process of its own:
# a thread of pytest's might wait for the interpreter while the run finishes)
WATCHER = r"""
import os, signal, sys, time
metrics, group = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    if os.path.exists(metrics):
        with open(metrics) as handle:
            if len(handle.readlines()) >= 3:
                break
    time.sleep(0.02)
os.killpg(group, signal.SIGTERM)
print("signalled", flush=True)
"""


class Preemption:
    """finetune.py under torchrun (one process), sent SIGTERM (to its process group, as
    Slurm preempts) once it has logged 3 iterations, so that it can start early and
    run beside other tests."""

    def __init__(self, run: Path, argv: list[str]):
        self.output = run.parent / f"{run.name}.out"  # a file: nobody reads it meanwhile
        # niced: on a loaded machine the watcher (not niced) still sees the 3rd iteration
        # before the run, a second of training, is over ("nice" execs: the pid is the run's)
        command = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run",
                   "--nproc_per_node", "1",
                   "--master_port", str(free_port()), str(REPO / "finetune.py"), *argv]
        with open(self.output, "wb") as handle:
            self.proc = subprocess.Popen(command, env=child_env(), cwd=REPO, stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(run / "metrics.jsonl"), str(self.proc.pid)],
            stdout=subprocess.PIPE, text=True)

    def finish(self) -> str:
        """Its output, once it has stopped."""
        self.proc.wait(timeout=420)
        if self.watcher.poll() is None:  # the run ended before it logged 3 iterations
            self.watcher.kill()
        signalled = "signalled" in self.watcher.communicate()[0]
        output = self.output.read_text(errors="replace")
        if not signalled:
            pytest.fail(f"the run ended before it could be interrupted:\n{output}")
        return output


SIGTERM_ITERS = 30


@starts_early("preempted")
def start_preempted(request):
    """The uninterrupted run (one process, a batch) and the interrupted one."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("sigterm")
    args = model_args(request.getfixturevalue("train_data"), SIGTERM_ITERS)
    uninterrupted = start_runs(1, [{"name": "straight", "argv": args + [
        "--save", str(root / "straight")]}], root / "launch", early=True)
    return root, uninterrupted, Preemption(root / "run", args + ["--save", str(root / "run")])


@pytest.fixture(scope="module")
def preempted(request):
    return started("preempted", request)


def test_sigterm_saves_then_resume_continues_exactly(preempted, train_data):
    """Train N, kill (SIGTERM, as Slurm preempts), resume to 2N == an uninterrupted 2N run."""
    root, uninterrupted, preemption = preempted
    iters, run = SIGTERM_ITERS, root / "run"
    output = preemption.finish()
    stopped_at = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped_at < iters, output[-3000:]
    assert "saving and exiting" in output or "stopping after iteration" in output

    # resumed (one process) beside what is left of the uninterrupted run
    resuming = start_runs(1, [{"name": "resume", "argv": model_args(train_data, iters) + [
        "--save", str(run), "--load", str(run)]}], root / "resume")
    assert uninterrupted.wait()["straight"].returncode == 0
    want = train_metrics(root / "straight")
    resumed = resuming.wait()["resume"]
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert_same_curve(train_metrics(run), want, rtol=1e-6)


def test_finetune_with_checkpoint_args_takes_shape_and_weights_only(serial_runs, reference):
    """--finetune --use_checkpoint_args: model shape from the checkpoint, fresh optimizer."""
    result = serial_runs["finetune"]
    assert result.returncode == 0, result.log[-3000:]
    assert "loaded weights from" in result.log
    tuned = train_metrics(serial_runs["root"] / "finetuned")
    assert [r["iteration"] for r in tuned] == [1, 2]  # iteration and data restart at 0
    assert tuned[0]["consumed_samples"] == 8
    assert tuned[0]["loss"] < reference[0]["loss"] - 0.1  # starts from the trained weights


def test_missing_or_corrupt_checkpoints_are_clear_errors(serial_runs):
    missing = serial_runs["missing"]
    assert missing.returncode != 0 and "no checkpoint found" in missing.log
    result = serial_runs["broken"]  # the tracker names a missing iteration directory
    assert result.returncode != 0 and "does not exist" in result.log
    result = serial_runs["truncated"]  # truncated shard files
    assert result.returncode != 0 and "cannot be loaded" in result.log


def test_two_node_launch_matches_single_process(parallel_runs, reference):
    """torchrun's multi-node flags (--nnodes/--node_rank/--master_addr/--master_port): the
    session's 2-process worker is launched as two 'nodes' of one process each on this
    machine (tests/runs.py:Worker), so the DP=2 run of ``parallel_runs`` is DP=2 across
    nodes: the same curve."""
    launch = RunResult.read(parallel_runs / "launch", "dp2").launch
    assert launch == {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"}
    assert_same_curve(train_metrics(parallel_runs / "dp2"), reference)


# Architectures beyond the default Llama: each trains serially once, then at TP=2 and PP=2
# on the same curve. Tied embeddings at PP=2 is the case that matters most: the last stage
# holds a copy of the word embeddings whose gradients megatron-core sums with the first's.
VARIANTS = {
    "llama-tied": ["--tie_embed_logits"],
    "qwen2": ["--model_name", "qwen2", "--tie_embed_logits"],  # QKV biases, tied
    "qwen3": ["--model_name", "qwen3", "--kv_channels", "32"],  # q/k norms, head size 32
    # four 1 + w norms, scaled tied embeddings, one key/value head (shared by both TP
    # ranks), windowed and global layers with their own RoPE bases, GeGLU
    "gemma3": ["--model_name", "gemma3", "--num_attention_heads_kv", "1", "--kv_channels",
               "32", "--sliding_window_size", "16", "--sliding_window_pattern", "2",
               "--query_pre_attn_scalar", "24", "--rope_scaling_factor", "2",
               "--rope_scaling_type", "linear"],
}
# tied embeddings at TP=2 are covered by Qwen2; Llama's tied run is the PP=2 one
# sequence parallelism for Gemma 3: its norms of the attention's and MLP's outputs see a
# slice of the sequence each
VARIANT_LAYOUTS = {"tp2": ["--tensor_model_parallel_size", "2"],
                   "pp2": ["--pipeline_model_parallel_size", "2"],
                   "tp2-sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel"]}
VARIANT_CASES = [(variant, layout) for variant in VARIANTS for layout in VARIANT_LAYOUTS
                 if (variant, layout) != ("llama-tied", "tp2")
                 and (layout != "tp2-sp" or variant == "gemma3")]


@starts_early("variant_runs")
def start_variant_runs(request):
    """Each variant's serial reference (one batch) beside its TP=2 / PP=2 runs (one
    2-process batch): two batches for all eight runs."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("variants")
    train_data = request.getfixturevalue("train_data")
    serial = start_runs(1, [{"name": f"{variant}-ref", "argv": model_args(train_data, ITERS)
                             + VARIANTS[variant] + ["--save", str(root / f"{variant}-ref")]}
                            for variant in VARIANTS], root / "serial", early=True)
    parallel = start_runs(2, [{"name": f"{variant}-{layout}", "argv": model_args(train_data, ITERS)
                               + VARIANTS[variant] + VARIANT_LAYOUTS[layout]
                               + ["--save", str(root / f"{variant}-{layout}")]}
                              for variant, layout in VARIANT_CASES], root / "parallel", early=True)
    return root, serial, parallel


@pytest.fixture(scope="module")
def variant_runs(request) -> Path:
    root, serial, parallel = started("variant_runs", request)
    results = {**parallel.wait(), **serial.wait()}
    assert all(r.returncode == 0 for r in results.values()), {
        name: r.log[-2000:] for name, r in results.items() if r.returncode}
    return root


@pytest.mark.parametrize("variant,layout", VARIANT_CASES,
                         ids=[f"{v}-{layout}" for v, layout in VARIANT_CASES])
def test_architecture_variants_match_single_process(variant_runs, variant, layout):
    run = variant_runs / f"{variant}-{layout}"
    assert_same_curve(train_metrics(run), train_metrics(variant_runs / f"{variant}-ref"))
    run_config = json.loads((run / "iter_0000006" / "run_config.json").read_text())
    assert run_config["model"]["tie_embeddings"] == ("--tie_embed_logits" in VARIANTS[variant]
                                                     or variant == "gemma3")
    if (variant, layout) == ("llama-tied", "pp2"):
        check_tied_checkpoint_stores_one_tensor(run)


def check_tied_checkpoint_stores_one_tensor(run) -> None:
    """A tied run saved at PP=2 merges to an unsharded file set with one vocabulary tensor
    (optimizer state included) and exports without ``lm_head``."""
    from safetensors.torch import load_file

    from megatron_ext.checkpointing.hf_export import ExportConfig, export_hf
    from megatron_ext.checkpointing.reshard import ReshardConfig, merge
    from megatron_ext.checkpointing.unsharded import UnshardedReader

    merge(ReshardConfig(str(run), str(run / "merged")))
    reader = UnshardedReader(str(run / "merged"))
    assert not [name for name in reader.names() if "output_layer" in name]
    assert any(name.startswith("optimizer.") for name in reader.names())
    summary = export_hf(ExportConfig(str(run), str(run / "hf"), dtype="fp32", progress=False))
    assert json.loads((run / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    weights = load_file(str(run / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in weights
    embedding = reader.view("embedding.word_embeddings.weight")[:summary.vocab_size]
    assert torch.equal(weights["model.embed_tokens.weight"], embedding)
