#!/usr/bin/env python3
"""The prepared GPU check: what the CPU test suite cannot run, against the fp32 serial run.

  python scripts/gpu_check.py [--workdir DIR]       (scripts/gpu_check.sh sets up a venv first)

On a machine with CUDA it trains a tiny Llama-2-like model for a few steps,
once per configuration, with ``finetune.py``'s own flags (``--bf16``,
``--fp16``, ``--use_distributed_optimizer``, ``--use_flash_attn``), stops and
resumes some of them, and compares every loss curve with the fp32 serial run
(or, for flash-attn, with the same precision on PyTorch SDPA). It prints ONE
table: check, reference, max difference, tolerance, PASS/FAIL/SKIP, and exits
non-zero when a check fails.

Why these tolerances (max relative difference of the per-iteration training
loss, 6 iterations, losses ~7):
  fp32 vs fp32           1e-5   same arithmetic; only reduction order may differ
  bf16 vs fp32           2e-2   bf16 keeps 8 mantissa bits (~4e-3 per rounding)
  fp16 vs fp32           1e-2   fp16 keeps 11 (~5e-4 per rounding), plus loss scaling
  resumed vs straight    1e-4   the same steps replayed; only GPU kernels that are not
                                bit-deterministic may differ
  flash vs SDPA (bf16)   2e-2   two bf16 kernels, each within bf16 rounding of exact

The data is full rows (every sample at least ``--seq_length`` tokens,
truncated to it, no padding), so the attention mask is the plain causal one
and ``PortableAttention`` may take the flash-attn path; the child counts the
calls into that path, so a flash check that silently fell back to SDPA fails.

fp16 starts megatron-core's dynamic loss scale at 2**12 instead of its
default 2**32 (in the child only, a test setting, no user flag): from 2**32 the
first ~15 steps overflow and are skipped, so a few-step curve would compare
a model that has not moved.

Transformer Engine: the trainer has no Transformer Engine layer spec (its
layers are megatron-core's local ones with ``PortableAttention``), so there
is nothing of it to check; the table says whether it is installed.

Everything that decides PASS/FAIL (:func:`max_relative_difference`,
:func:`verdict`, :func:`format_table`) is plain Python with a CPU unit test
(``tests/test_gpu_check.py``); nothing here is part of the CPU suite otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ITERS = 6
SEQ = 64
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 1e-2, "resume": 1e-4, "flash": 2e-2}
# the runs that stop at iteration 3 and are resumed, and the run each must reproduce
RESUMED = {"bf16-distopt-resumed": "bf16-distopt", "fp16-resumed": "fp16"}
# families with layers of their own, each in bf16 with flash-attn against its fp32 run:
# Gemma 3 (window and global layers, one key/value head, 1 + w norms), Falcon (parallel
# layers with two norms and biases)
FAMILIES = {"gemma3": ("--model_name", "gemma3", "--num_attention_heads_kv", "1",
                       "--kv_channels", "32", "--sliding_window_size", "16",
                       "--sliding_window_pattern", "2"),
            "falcon": ("--model_name", "falcon", "--parallel_attn_norms", "2",
                       "--add_bias_linear")}


# ------------------------------------------------------------------ verdicts (CPU-tested)
@dataclass
class Row:
    check: str
    reference: str
    difference: Optional[float]  # None: not measured (SKIP, or the run failed)
    tolerance: Optional[float]
    status: str  # PASS | FAIL | SKIP
    note: str = ""


def max_relative_difference(got: Sequence[float], want: Sequence[float]) -> float:
    """Largest ``|got - want| / |want|`` over the iterations; inf when the curves have
    different lengths or a value is not finite (a diverged or cut-short run)."""
    if len(got) != len(want) or not want:
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if not (math.isfinite(g) and math.isfinite(w)):
            return math.inf
        worst = max(worst, abs(g - w) / max(abs(w), 1e-12))
    return worst


def verdict(check: str, reference: str, got: Optional[Sequence[float]],
            want: Optional[Sequence[float]], tolerance: Optional[float],
            skip: str = "") -> Row:
    """One table row: SKIP with a reason, FAIL when a curve is missing or too far off."""
    if skip:
        return Row(check, reference, None, tolerance, "SKIP", skip)
    if got is None or want is None:
        return Row(check, reference, None, tolerance, "FAIL",
                   "run failed" if got is None else "reference run failed")
    if tolerance is None:
        raise ValueError(f"{check}: a measured check needs a tolerance")
    difference = max_relative_difference(got, want)
    return Row(check, reference, difference, tolerance,
               "PASS" if difference <= tolerance else "FAIL")


def format_table(rows: Sequence[Row]) -> str:
    """The summary: one line per check, aligned columns."""
    header = ("check", "reference", "max rel. diff", "tolerance", "result")
    lines = [header]
    for row in rows:
        diff = "-" if row.difference is None else f"{row.difference:.2e}"
        tol = "-" if row.tolerance is None else f"{row.tolerance:.0e}"
        result = row.status + (f" ({row.note})" if row.note else "")
        lines.append((row.check, row.reference, diff, tol, result))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def passed(rows: Sequence[Row]) -> bool:
    return all(row.status != "FAIL" for row in rows)


# ------------------------------------------------------------------ the runs
def model_args(prefix: str, vocab: str, iters: int = ITERS) -> list[str]:
    """The CPU suite's tiny model (tests/runs.py), on full rows of SEQ tokens."""
    return ["--data_path", prefix, "--split", "90,10,0",
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", vocab,
            "--vocab_extra_ids_list", "<|im_start|>,<|im_end|>", "--model_name", "llama2",
            "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4",
            "--num_attention_heads_kv", "2", "--seq_length", str(SEQ),
            "--micro_batch_size", "2", "--global_batch_size", "8", "--train_iters", str(iters),
            "--lr", "1e-3", "--lr_warmup_iters", "1", "--eval_iters", "1", "--seed", "1234"]


def runs_for(base: list[str], root: Path) -> list[dict]:
    """Every run of the one-GPU launch, in order: a resumed run (``NAME``, stopped at 3)
    is continued by ``NAME-2`` in the same directory, after it."""
    def run(name: str, *flags: str) -> dict:
        return {"name": name, "argv": base + list(flags) + ["--save", str(root / name)]}

    runs = [run("fp32"), run("bf16", "--bf16"), run("fp16", "--fp16"),
            run("fp32-distopt", "--use_distributed_optimizer"),
            run("bf16-distopt", "--bf16", "--use_distributed_optimizer"),
            run("bf16-flash", "--bf16", "--use_flash_attn"),
            # LoRA on the fp32 run's final checkpoint: bf16 adapters (fp32 DoRA norms) on GPU
            run("lora-fp32", "--load", str(root / "fp32"), "--peft", "lora"),
            run("lora-bf16", "--load", str(root / "fp32"), "--peft", "lora", "--bf16"),
            run("dora-bf16", "--load", str(root / "fp32"), "--peft", "dora", "--bf16")]
    for family, flags in FAMILIES.items():
        runs += [run(f"{family}-fp32", *flags),
                 run(f"{family}-bf16-flash", *flags, "--bf16", "--use_flash_attn")]
    flags = {"bf16-distopt-resumed": ("--bf16", "--use_distributed_optimizer"),
             "fp16-resumed": ("--fp16",)}
    for name in RESUMED:
        runs.append(run(name, *flags[name], "--exit_interval", "3"))
        again = run(name, *flags[name], "--load", str(root / name))
        runs.append(dict(again, name=f"{name}-2"))
    return runs


def losses(directory: Path) -> Optional[list[float]]:
    path = directory / "metrics.jsonl"
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        return [r["loss"] for r in map(json.loads, handle) if r["split"] == "train"]


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def rows_for(root: Path, two_gpus: bool, flash_calls: int) -> list[Row]:
    ref = losses(root / "fp32")
    rows = [
        verdict("--bf16", "fp32", losses(root / "bf16"), ref, TOLERANCE["bf16"]),
        verdict("--fp16 (loss scale from 2^12)", "fp32", losses(root / "fp16"), ref,
                TOLERANCE["fp16"]),
        verdict("--use_distributed_optimizer", "fp32", losses(root / "fp32-distopt"), ref,
                TOLERANCE["fp32"]),
        verdict("--use_distributed_optimizer --bf16", "fp32", losses(root / "bf16-distopt"),
                ref, TOLERANCE["bf16"]),
    ]
    for name, straight in RESUMED.items():
        rows.append(verdict(f"{straight}: stop at 3, resume", f"{straight} straight",
                            losses(root / name), losses(root / straight), TOLERANCE["resume"]))
    flash_skip = "" if importable("flash_attn") else "flash-attn not installed"
    flash_got = losses(root / "bf16-flash")
    if not flash_skip and flash_calls == 0:
        flash_got, flash_skip = None, ""
    flash = verdict("--use_flash_attn (flash-attn path)", "bf16 SDPA", flash_got,
                    losses(root / "bf16"), TOLERANCE["flash"], flash_skip)
    if not flash_skip and flash_calls == 0:
        flash.note = "the flash-attn path was never taken"
    rows.append(flash)
    rows.append(verdict("--use_flash_attn", "fp32", losses(root / "bf16-flash"), ref,
                        TOLERANCE["bf16"]))
    lora = losses(root / "lora-fp32")
    rows.append(verdict("--peft lora --bf16", "LoRA fp32", losses(root / "lora-bf16"), lora,
                        TOLERANCE["bf16"]))
    rows.append(verdict("--peft dora --bf16", "LoRA fp32 (DoRA starts equal)",
                        losses(root / "dora-bf16")[:1] if losses(root / "dora-bf16") else None,
                        lora[:1] if lora else None, TOLERANCE["bf16"]))
    for family in FAMILIES:
        rows.append(verdict(f"{family} --bf16 --use_flash_attn", f"{family} fp32",
                            losses(root / f"{family}-bf16-flash"),
                            losses(root / f"{family}-fp32"), TOLERANCE["bf16"]))
    if two_gpus:
        rows.append(verdict("DP=2 --use_distributed_optimizer", "fp32",
                            losses(root / "dp2-distopt"), ref, TOLERANCE["fp32"]))
        rows.append(verdict("TP=2 --bf16", "fp32", losses(root / "tp2-bf16"), ref,
                            TOLERANCE["bf16"]))
    else:
        rows.append(verdict("DP=2 / TP=2 on 2 GPUs", "fp32", None, None, None,
                            "one GPU visible"))
    te = ("installed; the trainer has no Transformer Engine layers to check"
          if importable("transformer_engine") else "not installed")
    rows.append(verdict("Transformer Engine", "-", None, None, None, te))
    return rows


# ------------------------------------------------------------------ data
def prepare_data(directory: Path) -> tuple[str, str]:
    """A SentencePiece tokenizer trained on the bundled sample, and records that are each
    at least SEQ tokens long (six sample answers joined), truncated to SEQ (those whose
    question alone fills SEQ are rejected: about 140 of 200 remain)."""
    from instruct.preprocess_instruct_data import build_parser, config_from_args
    from megatron_ext.data.preprocess import run_preprocess
    from megatron_ext.tokenizers.training import jsonl_texts, train_sentencepiece

    sample = REPO / "data" / "sample" / "training.jsonl"
    vocab = train_sentencepiece(list(jsonl_texts([sample])), str(directory / "tokenizer"),
                                vocab_size=1500)
    records = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines()]
    out = []
    for i in range(200):
        answer = " ".join(records[(i + k) % len(records)]["answer"] for k in range(6))
        out.append({"question": records[i % len(records)]["question"], "answer": answer})
    source = directory / "full_rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    run_preprocess(config_from_args(build_parser().parse_args([
        "--input", str(source), "--output_prefix", str(directory / "train"),
        "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", vocab,
        "--vocab_extra_ids_list", "<|im_start|>,<|im_end|>", "--question_key", "question",
        "--answer_key", "answer", "--max_seq_length", str(SEQ), "--overlong", "truncate",
        "--workers", "4", "--no_progress"])))
    return str(directory / "train"), vocab


def launch(nproc: int, runs: list[dict], directory: Path, timeout: int) -> str:
    """One torchrun launch of this script's child mode; returns its output."""
    from megatron_ext.parallel import free_port  # light: no torch at import

    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "spec.json"
    spec.write_text(json.dumps(runs), encoding="utf-8")
    # keep an inherited PYTHONPATH: carried wheels (gpu_check.sh) are installed there
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="4", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(Path(__file__).resolve()), "--child",
               str(spec)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    (directory / "launch.log").write_text(output, encoding="utf-8")
    if result.returncode != 0:
        print(f"launch in {directory} failed ({result.returncode}):\n{output[-4000:]}",
              file=sys.stderr)
    return output


def child(spec: Path) -> None:
    """In the torchrun child: count flash-attn calls, start fp16 at a loss scale of 2**12,
    then every run of the spec as tests/training/run_many.py does."""
    import megatron.core.optimizer as optimizer
    from megatron_ext.models import attention
    from tests.training import run_many

    calls = {"flash": 0}
    flash = attention._flash_attention

    def counted(*args, **kwargs):
        calls["flash"] += 1
        return flash(*args, **kwargs)

    attention._flash_attention = counted
    base = optimizer.OptimizerConfig

    class FewStepFp16(base):  # see the module docstring
        def __post_init__(self):
            if self.fp16 and self.loss_scale is None:
                self.initial_loss_scale = 2.0**12
            super().__post_init__()

    optimizer.OptimizerConfig = FewStepFp16
    run_many.setup_logging()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        for run in json.loads(spec.read_text(encoding="utf-8")):
            calls["flash"] = 0
            code = run_many.run_one(run["argv"], spec.parent / f"{run['name']}.log")
            if rank0:
                (spec.parent / f"{run['name']}.json").write_text(json.dumps(
                    {"returncode": code, "flash_calls": calls["flash"]}))
    finally:
        run_many.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child))
        return 0
    import torch

    start = time.monotonic()
    if not torch.cuda.is_available():
        print(format_table([Row("every GPU check", "-", None, None, "SKIP", "no CUDA device")]))
        return 2
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s): "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch).resolve()
        root.mkdir(parents=True, exist_ok=True)
        prefix, vocab = prepare_data(root)
        base = model_args(prefix, vocab)
        launch(1, runs_for(base, root), root / "one_gpu", timeout=240)
        if gpus >= 2:
            launch(2, [{"name": "dp2-distopt", "argv": base + [
                          "--use_distributed_optimizer", "--save", str(root / "dp2-distopt")]},
                       {"name": "tp2-bf16", "argv": base + [
                          "--bf16", "--tensor_model_parallel_size", "2",
                          "--save", str(root / "tp2-bf16")]}], root / "two_gpus", timeout=60)
        status = root / "one_gpu" / "bf16-flash.json"
        flash_calls = json.loads(status.read_text())["flash_calls"] if status.exists() else 0
        rows = rows_for(root, gpus >= 2, flash_calls)
        print(format_table(rows))
        kept = str(root) if args.workdir else "a temporary directory (--workdir keeps them)"
        print(f"({time.monotonic() - start:.0f} s; logs in {kept})")
    return 0 if passed(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
