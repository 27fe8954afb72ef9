#!/usr/bin/env python3
"""Finetuning a real model: SmolLM2-135M-Instruct's training step, one process (TP=1) against
data parallel 2 (DP=2), real tokens/s.

What it does:
1. imports the SmolLM2 GGUF of ``.assets/smollm2`` (``scripts/setup_env.sh`` installs it)
   once into an import cache in the work folder (``finetune.py --load model.gguf`` then
   reuses it) and preprocesses ``data/sample/training.jsonl`` with the model's own chat
   template (``--chat_format hf``);
2. trains ``--iters`` iterations from the GGUF, the same data, seed and global batch
   (packed sequences of up to ``--seq_length`` tokens), alternately
   (a) baseline, TP=1: one process with all the CPUs as threads;
   (b) DP=2: ``torchrun --nproc_per_node 2``, the CPUs split between the two processes;
   ``--repeat`` times each, keeping each one's best run;
3. reads each run's ``metrics.jsonl``, drops the first ``--warmup`` iterations and prints
   median real (non-padding) tokens/s, the median step time, the final loss (the same
   batches: both must end at the same loss up to float summation order) and the ratio
   (b)/(a). Other CPU load during each run is shown: the machine is shared.

The head count of SmolLM2-135M (9 query, 3 key/value heads) rules out TP=2.

  python bench/finetune_smollm2.py                    # ~4 minutes on 2 idle cores
  python bench/finetune_smollm2.py --iters 12 --repeat 2 --workdir runs/bench-smollm2
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _bench_train():
    """bench/train.py's measuring helpers (CPU accounting, metrics summary)."""
    spec = importlib.util.spec_from_file_location("bench_train",
                                                  os.path.join(REPO, "bench", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(workdir: str, seq_length: int) -> tuple[str, str, str]:
    """(gguf path, cache dir, data prefix): the import cached, the sample preprocessed."""
    from instruct.preprocess_instruct_data import build_parser, config_from_args
    from megatron_ext.checkpointing.import_cache import ImportOptions, ensure_imported
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
    from megatron_ext.data.preprocess import run_preprocess

    found = sorted(glob.glob(os.path.join(REPO, ".assets", "smollm2", "**", "*.gguf"),
                             recursive=True))
    if not found:
        raise SystemExit("the SmolLM2 GGUF is missing from .assets/smollm2: run "
                         "./scripts/setup_env.sh")
    cache = os.path.join(workdir, "imports")
    cached = ensure_imported(found[0], cache, ImportOptions())
    tokenizer = tokenizer_config_from_run(cached.path, cached.run_config)
    prefix = os.path.join(workdir, "data", "train")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    run_preprocess(config_from_args(build_parser().parse_args([
        "--input", os.path.join(REPO, "data", "sample", "training.jsonl"),
        "--output_prefix", prefix, "--tokenizer_type", tokenizer.tokenizer_type,
        "--vocab_file", tokenizer.vocab_file, "--question_key", "question",
        "--answer_key", "answer", "--system_key", "system", "--chat_format", "hf",
        "--max_seq_length", str(seq_length), "--overlong", "truncate", "--workers", "2",
        "--no_progress"])))
    return found[0], cache, prefix


def run(name: str, nproc: int, gguf: str, cache: str, prefix: str, args, workdir: str,
        helpers, extra: tuple = (), micro_batch_size: int | None = None) -> dict:
    """One torchrun from the GGUF (or, ``cache`` None, the model directory ``gguf``); its
    summary (``bench/train.py``'s) with ``text`` (the log) and ``save`` (the run's
    directory) added. ``extra``: more finetune.py flags;
    ``micro_batch_size``: default the global batch split over the processes."""
    save = os.path.join(workdir, name)
    shutil.rmtree(save, ignore_errors=True)
    threads = max(1, helpers._cpus() // nproc)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    from megatron_ext.parallel import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.join(REPO, "finetune.py"),
               "--load", gguf, *(("--import_cache_dir", cache) if cache else ()),
               "--data_path", prefix,
               "--split", "100,0,0", "--seq_length", str(args.seq_length),
               "--variable_seq_lengths", "--pack_sequences", "--micro_batch_size",
               str(micro_batch_size or args.global_batch_size // nproc), "--global_batch_size",
               str(args.global_batch_size), "--train_iters", str(args.iters), "--lr", "1e-4",
               "--lr_warmup_iters", "1", "--seed", "1234", "--log_interval", "1",
               "--eval_iters", "0", "--save", save, "--save_interval", str(10 * args.iters),
               *extra]
    log = os.path.join(workdir, f"{name}.log")
    jiffies, own = helpers._cpu_jiffies(), helpers._children_cpu_seconds()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, env=env, cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=args.timeout)
    seconds = time.perf_counter() - start
    after, own = helpers._cpu_jiffies(), helpers._children_cpu_seconds() - own
    with open(log, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}), log {log}:\n"
                         f"{text[-4000:]}")
    import json

    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [r for r in map(json.loads, handle) if r.get("split") == "train"]
    summary = helpers.summarize(records, args.warmup)
    other = summary["other_cpu"] = helpers.other_cpu_share(jiffies, after, own, seconds)
    summary["peak_mb"] = max(r["memory_mb"] for r in records)
    print(f"  {name}: {seconds:.0f} s with start-up, median step {summary['iter_time']:.2f} s, "
          f"real tok/s {summary['real_tokens_per_sec']:,.0f}, peak {summary['peak_mb']:,.0f} "
          f"MB, other CPU load {100 * other:.0f}%", flush=True)
    return {**summary, "text": text, "save": save, "records": records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--global_batch_size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.iters <= args.warmup:
        parser.error("--iters must exceed --warmup")
    helpers = _bench_train()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-smollm2-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"importing SmolLM2 and preprocessing the sample in {workdir} ...", flush=True)
        gguf, cache, prefix = prepare(workdir, args.seq_length)
        print(f"training {args.iters} iterations of {args.global_batch_size} packed samples "
              f"(seq {args.seq_length}), {args.repeat} run(s) each ...", flush=True)
        runs: dict[str, list[dict]] = {"tp1": [], "dp2": []}
        for number in range(1, args.repeat + 1):
            runs["tp1"].append(run(f"tp1-{number}", 1, gguf, cache, prefix, args, workdir,
                                   helpers))
            runs["dp2"].append(run(f"dp2-{number}", 2, gguf, cache, prefix, args, workdir,
                                   helpers))
        best = {k: max(v, key=lambda s: s["real_tokens_per_sec"]) for k, v in runs.items()}
        print(f"\n{'SmolLM2-135M finetuning step':<34}{'real tok/s':>11}{'step s':>9}"
              f"{'loss':>10}{'other %':>9}")
        for key, label in (("tp1", "(a) TP=1, 1 process"), ("dp2", "(b) DP=2, 2 processes")):
            s = best[key]
            print(f"{label:<34}{s['real_tokens_per_sec']:>11,.0f}{s['iter_time']:>9.2f}"
                  f"{s['loss']:>10.4f}{100 * s['other_cpu']:>9.0f}")
        ratio = best["dp2"]["real_tokens_per_sec"] / best["tp1"]["real_tokens_per_sec"]
        print(f"DP=2 / TP=1 real tokens/s: {ratio:.2f}x")
        if max(s["other_cpu"] for s in best.values()) > 0.10:
            print("note: other jobs used over 10% of the CPUs during a run: the ratio is noisy")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
