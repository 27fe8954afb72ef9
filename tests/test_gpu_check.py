"""scripts/gpu_check.py's CPU side: the verdicts, the table, the runs and the data it
trains on (the GPU runs themselves are not part of the CPU suite)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
_spec.loader.exec_module(gpu_check)


def test_max_relative_difference():
    assert gpu_check.max_relative_difference([7.0, 6.0], [7.0, 6.0]) == 0.0
    assert gpu_check.max_relative_difference([7.07, 6.0], [7.0, 6.0]) == pytest.approx(0.01)
    assert gpu_check.max_relative_difference([7.0], [7.0, 6.0]) == math.inf  # cut short
    assert gpu_check.max_relative_difference([float("nan"), 6.0], [7.0, 6.0]) == math.inf
    assert gpu_check.max_relative_difference([], []) == math.inf


def test_verdicts_per_tolerance():
    tol = gpu_check.TOLERANCE
    assert tol["fp32"] == 1e-5 and tol["bf16"] == 2e-2 and tol["fp16"] == 1e-2
    want = [7.0, 6.5, 6.0]
    bf16 = [w * (1 + 1.5e-2) for w in want]
    assert gpu_check.verdict("bf16", "fp32", bf16, want, tol["bf16"]).status == "PASS"
    assert gpu_check.verdict("fp16", "fp32", bf16, want, tol["fp16"]).status == "FAIL"
    assert gpu_check.verdict("x", "fp32", None, want, tol["fp32"]).note == "run failed"
    assert gpu_check.verdict("x", "fp32", want, None, tol["fp32"]).status == "FAIL"
    skipped = gpu_check.verdict("flash", "bf16", None, None, None, "flash-attn not installed")
    assert skipped.status == "SKIP" and skipped.difference is None


def test_one_table_and_skips_do_not_fail():
    rows = [gpu_check.verdict("--bf16", "fp32", [7.01], [7.0], 2e-2),
            gpu_check.verdict("Transformer Engine", "-", None, None, None, "not installed")]
    table = gpu_check.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["check", "reference"] and set(lines[1]) == {"-"}
    assert "PASS" in lines[2] and "1.43e-03" in lines[2] and "2e-02" in lines[2]
    assert "SKIP (not installed)" in lines[3]
    assert gpu_check.passed(rows)
    assert not gpu_check.passed(rows + [gpu_check.verdict("x", "y", None, [1.0], 1e-5)])


def test_rows_from_a_workdir(tmp_path):
    """Metrics files in, table rows out: a failed (absent) run fails its check; a flash
    run that never took the flash path cannot pass."""
    def write(name, values):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            f'{{"iteration": {i + 1}, "split": "train", "loss": {v}}}\n'
            for i, v in enumerate(values)))

    ref = [7.0, 6.9, 6.8]
    write("fp32", ref)
    write("bf16", [v * 1.01 for v in ref])
    write("bf16-flash", [v * 1.011 for v in ref])
    rows = {row.check: row for row in gpu_check.rows_for(tmp_path, False, flash_calls=0)}
    assert rows["--bf16"].status == "PASS"
    assert rows["--use_distributed_optimizer"].status == "FAIL"  # no such run
    flash = rows["--use_flash_attn (flash-attn path)"]
    if gpu_check.importable("flash_attn"):
        assert flash.status == "FAIL"
    else:
        assert flash.status == "SKIP"
    assert rows["DP=2 / TP=2 on 2 GPUs"].status == "SKIP"


def test_resumed_runs_follow_the_runs_they_resume():
    runs = gpu_check.runs_for(["BASE"], Path("/w"))
    names = [r["name"] for r in runs]
    assert names[0] == "fp32" and len(set(names)) == len(names)
    for name, straight in gpu_check.RESUMED.items():
        assert straight in names and names.index(f"{name}-2") == names.index(name) + 1
        first, again = runs[names.index(name)], runs[names.index(f"{name}-2")]
        assert "--exit_interval" in first["argv"] and "--exit_interval" not in again["argv"]
        assert again["argv"][again["argv"].index("--load") + 1] == str(Path("/w") / name)
        assert first["argv"][-2:] == again["argv"][-2:] == ["--save", str(Path("/w") / name)]


@pytest.mark.slow
def test_data_has_full_rows(tmp_path):
    """Every training sample fills --seq_length: no padding, so the mask is the plain causal
    one that lets PortableAttention take the flash-attn path."""
    from megatron_ext.data.instruction_dataset import InstructionDataset

    prefix, _ = gpu_check.prepare_data(tmp_path)
    dataset = InstructionDataset(prefix)
    lengths = np.array([len(dataset[i][0]) for i in range(len(dataset))])
    assert len(lengths) >= 100 and (lengths == gpu_check.SEQ).all()
