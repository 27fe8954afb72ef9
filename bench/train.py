#!/usr/bin/env python3
"""Trainer throughput: padded to --seq_length, --variable_seq_lengths, and packing, in one run.

What it does:
1. generates a corpus (default 3,000 records) with instruction-like length
   distributions (``bench/preprocess.py``'s ``generate_corpus``: log-normal
   questions and answers, a long tail, system prompts on a third, some
   unicode), deterministically from a seed;
2. trains a small Llama-style SentencePiece tokenizer on it (vocab ~4,000) and
   preprocesses it as ChatML with ``--max_seq_length`` equal to the training
   ``--seq_length`` and ``--overlong truncate`` (so no record is dropped, and
   every sample fits a row);
3. trains a small Llama-2-style model on CPU with ``torchrun``, on the same
   data, seed and schedule (so the same global batches, in the same order):
   (a) baseline: every micro-batch padded to ``--seq_length``;
   (b) ``--variable_seq_lengths``: each micro-batch padded to its longest
       sample, rounded up to a multiple of 16;
   (c) ``--variable_seq_lengths --pack_sequences --pack_scope micro_batch``:
       each micro-batch's samples packed into as few rows as fit ``--seq_length``;
   (d) ``--variable_seq_lengths --pack_sequences``: each epoch's records packed
       into rows of ``--seq_length`` (a sample is then a row: other batches, so
       another loss; as many rows a step as (a)-(c) have records);
   (a) to (d) alternate ``--repeat`` times (default 2); for each, the
   run with the highest median real tokens/s is kept;
4. reads each run's ``metrics.jsonl`` (logged every iteration by the trainer),
   drops the first ``--warmup`` iterations, and prints per run: median
   tokens/s (positions computed, padding included), median real tokens/s
   (non-padding positions), mean padding fraction, median data-wait share of
   the step (time spent building the global batch / iteration time, as the
   trainer measures it), median step time, and the ratios (b)/(a), (c)/(a)
   and (d)/(c) of real tokens/s. (a), (b) and (c) must end at the same loss
   (same batches): a check that (b) and (c) compute the same thing as (a),
   only on fewer positions.

Target: data wait below 2% of step time, for each run; a PASS/FAIL line is
printed per run (the exit status stays 0 either way: this is a measurement,
not a test). Only ratios and shares are compared; absolute times depend on
the machine and are shown for context only. The machine is noisy (other
jobs, a hypervisor that steals CPU): each run also reports the share of the
CPUs that something else used while it ran ("other %", from /proc/stat minus
the run's own CPU time), and a note is printed when it exceeds 10%.

Long sequences and context parallelism (``--long``, instead of the runs above):
the same corpus's answers joined into records of ``--long_seq_length`` tokens
(default 4,096; every row full), trained with micro batch 1 at CP=1 (one
process) and CP=2 (two processes, ``--context_parallel_size 2``), same data,
seed and schedule. Each run is measured inside its processes
(``--probe``): one warm-up step (Adam's state, caches), then the resident
memory of each rank before the measured steps and its peak during them
(Linux's VmHWM, reset through /proc/self/clear_refs; a sampling thread where
that is refused), with glibc's mmap threshold fixed so that freed tensors
leave the resident set. Printed per run: activation memory per rank (peak -
before, the largest rank), peak memory per rank, tokens/s; then the ratios
CP=2/CP=1. Target: activation memory per rank at CP=2 at most 65% of CP=1's
(it holds half the positions; the gathered keys and values are the whole row).

Each training run is a fresh ``torchrun`` process group with
OMP_NUM_THREADS = CPUs / --nproc, no validation split (evaluation off, so
every logged iteration is a training step) and no intermediate checkpoint
(the trainer writes one final checkpoint into the run's --save directory,
after the last timed iteration).

  python bench/train.py                           # defaults: ~1.5 minutes on 2 idle cores
  python bench/train.py --iters 40 --seq_length 1024
  python bench/train.py --nproc 2                 # data parallel 2 (gloo, 1 thread each)
  python bench/train.py --workdir runs/bench-train   # keep corpus, data, logs, metrics
  python bench/train.py --long                    # 4k-token rows: CP=1 vs CP=2 memory
  python bench/train.py --long --long_seq_length 2048 --long_iters 3   # quicker
  python bench/train.py --optimizer --seq_length 256   # distributed optimizer, bf16
  python bench/train.py --moe --seq_length 256    # 8 experts top-2: EP=1 vs EP=2

A real model on real short records (``--smollm2``, instead of the runs above):
SmolLM2-135M-Instruct from the GGUF of ``.assets/smollm2`` (``scripts/setup_env.sh``)
finetuned on the bundled sample (``data/sample``, the model's chat template, records cut
at ``--seq_length`` 512), one process with every CPU as a thread, micro batch
``--smollm2_micro_batch_size`` (2), global batch ``--smollm2_global_batch_size`` (4),
``--smollm2_iters`` (3) steps, the first a warm-up:
   before: ``--pack_sequences --pack_scope micro_batch`` (a sample is a record, each
           micro-batch's records packed, rows as full as chance makes them);
   after:  ``--pack_sequences`` (each epoch's records packed by best-fit decreasing; a
           sample is a row of --seq_length tokens).
Printed per run: real tokens/s, padding, step time, and the model's training FLOP/s on
the real tokens (6 x parameters per token for the matmuls, plus attention over each
record's causal context) against ``torch.mm``'s rate measured in the same run (fp32,
the same threads, model-shaped and square products, before and after the training runs,
the best of them): the step's share of the machine's matmul limit; and the padding over
the whole first epoch's batches (computed from the data, no training) with the real
tokens/s it implies (the measured positions/s x (1 - that padding): a few measured steps
see a few batches). Target: after/before real tokens/s >= 1.3, both ways.

  python bench/train.py --smollm2                 # ~4 minutes on 2 idle cores

The two training backends on the same real model (``--smollm2 --backend both``, or one of
``megatron``, ``hf``): the megatron backend from the GGUF's import, the Hugging Face
backend (``--backend hf``: transformers' own LlamaForCausalLM, FSDP2) from that import
exported once with tools/megatron_to_hf.py (the same weights and tokenizer), the same
data, packing per epoch and global batch, at DP=1 (one process, every CPU a thread) and
DP=2 (two processes, the CPUs split), and the hf backend with ``--compile`` (inductor) at
DP=1. Printed: real tokens/s and peak memory (rank 0's resident set, the largest at a
logged step) per run, and the ratios hf/megatron, DP=2/DP=1 and compiled/eager of runs
measured in this one call.

  python bench/train.py --smollm2 --backend both  # ~10 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_ext.parallel import free_port  # noqa: E402

CHATML = ("<|im_start|>", "<|im_end|>")
TARGET_DATA_WAIT = 0.02  # share of the step spent building the global batch
TARGET_CP_SAVING = 0.35  # activation memory per rank at CP=2 below CP=1's by this share
TARGET_PACKING_GAIN = 1.3  # --smollm2: real tokens/s, dataset packing / micro-batch packing


def _bench_preprocess():
    """``bench/preprocess.py`` as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "bench_preprocess", os.path.join(REPO, "bench", "preprocess.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- data
def long_corpus(short: str, path: str, records: int, chars: int) -> None:
    """``records`` long records: consecutive answers of the ``short`` corpus joined until
    each has ``chars`` characters (the same words, so the tokenizer trained on it fits)."""
    with open(short, encoding="utf-8") as handle:
        answers = [json.loads(line)["answer"] for line in handle]
    index = 0
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(records):
            parts, size = [], 0
            while size < chars:
                parts.append(answers[index % len(answers)])
                size += len(parts[-1]) + 2
                index += 1
            record = {"question": "Summarise this document.", "answer": "\n\n".join(parts)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare_data(workdir: str, records: int, seq_length: int, vocab_size: int, seed: int,
                 long_records: int = 0) -> dict:
    """Corpus -> SentencePiece tokenizer -> ChatML .bin/.idx truncated to ``seq_length``;
    ``long_records``: that many records of at least ``seq_length`` tokens instead (made
    from the corpus, :func:`long_corpus`)."""
    from instruct.preprocess_instruct_data import build_parser, config_from_args
    from megatron_ext.data.preprocess import run_preprocess
    from megatron_ext.tokenizers.training import jsonl_texts, train_sentencepiece

    corpus = os.path.join(workdir, "corpus.jsonl")
    start = time.perf_counter()
    size = _bench_preprocess().generate_corpus(corpus, records, seed=seed)
    print(f"  corpus: {records:,} records, {size / 1e6:.1f} MB "
          f"({time.perf_counter() - start:.1f} s)", flush=True)

    start = time.perf_counter()
    vocab_file = train_sentencepiece(jsonl_texts([corpus]), os.path.join(workdir, "tokenizer"),
                                     vocab_size)
    print(f"  tokenizer: {vocab_file} ({time.perf_counter() - start:.1f} s)", flush=True)

    if long_records:
        source = os.path.join(workdir, "long.jsonl")
        long_corpus(corpus, source, long_records, chars=8 * seq_length)  # > 1 token / 8 chars
        corpus = source
    start = time.perf_counter()
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    prefix = os.path.join(workdir, "data", "train")
    argv = ["--input", corpus, "--output_prefix", prefix,
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", vocab_file,
            "--vocab_extra_ids_list", ",".join(CHATML), "--question_key", "question",
            "--answer_key", "answer", "--system_key", "system", "--chat_format", "chatml",
            "--max_seq_length", str(seq_length), "--overlong", "truncate",
            "--workers", str(min(2, _cpus())), "--no_progress"]
    summary = run_preprocess(config_from_args(build_parser().parse_args(argv)))
    stats = summary.stats
    with open(prefix + "-meta.json", encoding="utf-8") as handle:
        meta = json.load(handle)
    counts = meta.get("counts", {})
    print(f"  preprocessed: {prefix}: {counts.get('records_out', '?'):,} of "
          f"{stats.records_in:,} records kept ({counts.get('truncated', 0):,} truncated, "
          f"{counts.get('rejected', 0):,} rejected: prompt alone over {seq_length} tokens), "
          f"{int(stats.role_tokens.sum()):,} tokens, vocabulary "
          f"{meta.get('tokenizer', {}).get('vocab_size', '?')} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return {"prefix": prefix, "vocab_file": vocab_file, "meta": meta}


# ---------------------------------------------------------------- training
def train_args(data: dict, args, save: str, mode: str) -> list[str]:
    out = ["--data_path", data["prefix"], "--split", "100,0,0",
           "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", data["vocab_file"],
           "--vocab_extra_ids_list", ",".join(CHATML), "--model_name", "llama2",
           "--num_layers", str(args.num_layers), "--hidden_size", str(args.hidden_size),
           "--num_attention_heads", str(args.num_attention_heads),
           "--num_attention_heads_kv", str(args.num_attention_heads_kv),
           "--seq_length", str(args.seq_length),
           "--micro_batch_size", str(args.micro_batch_size),
           "--global_batch_size", str(args.global_batch_size),
           "--train_iters", str(args.iters), "--lr", "3e-4", "--lr_warmup_iters", "2",
           "--seed", str(args.seed), "--log_interval", "1", "--save", save]
    if mode in ("variable", "packed", "dataset"):
        out.append("--variable_seq_lengths")
    if mode == "packed":
        out += ["--pack_sequences", "--pack_scope", "micro_batch"]
    if mode == "dataset":
        out.append("--pack_sequences")
    return out


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) jiffies of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]) - idle - steal, steal


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, recursively
    return usage.ru_utime + usage.ru_stime


def other_cpu_share(before, after, own: float, seconds: float) -> float:
    """Share of the machine's CPUs that something else used over ``seconds`` (other
    jobs, the hypervisor's steal): ``before``/``after`` from :func:`_cpu_jiffies`, ``own``
    the run's CPU seconds; 0 off Linux."""
    if before is None or after is None:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    busy, steal = (after[0] - before[0]) / hz, (after[1] - before[1]) / hz
    return max(0.0, busy - own + steal) / (seconds * _cpus())


def logged_run(what: str, command: list[str], env: dict, log: str, timeout: int) -> None:
    """Run ``command`` with its output (after the command line) in ``log``; a failure
    ends the benchmark with the log's tail."""
    with open(log, "w", encoding="utf-8") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        result = subprocess.run(command, env=env, cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        with open(log, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-4000:]
        raise SystemExit(f"{what} failed (exit {result.returncode}); log {log}:\n{tail}")


def run_training(name: str, data: dict, args, workdir: str, mode: str) -> dict:
    """One torchrun; returns its train records (metrics.jsonl) and what else used the CPUs."""
    save = os.path.join(workdir, name)
    shutil.rmtree(save, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    os.makedirs(save)
    threads = max(1, _cpus() // args.nproc)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(free_port()), os.path.join(REPO, "finetune.py"),
               *train_args(data, args, save, mode)]
    jiffies, own = _cpu_jiffies(), _children_cpu_seconds()
    start = time.perf_counter()
    logged_run(f"training run {name}", command, env, os.path.join(workdir, f"{name}.log"),
               args.timeout)
    seconds = time.perf_counter() - start
    after, own = _cpu_jiffies(), _children_cpu_seconds() - own
    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [r for r in map(json.loads, handle) if r.get("split") == "train"]
    if len(records) != args.iters:
        raise SystemExit(f"training run {name} logged {len(records)} iterations, "
                         f"expected {args.iters}")
    # CPU time used on this machine by anything but this run (other jobs, the
    # hypervisor's steal), as a share of the machine's capacity during the run
    summary = summarize(records, args.warmup)
    other = summary["other_cpu"] = other_cpu_share(jiffies, after, own, seconds)
    print(f"  {name}: {seconds:.1f} s with start-up, median step {summary['iter_time']:.3f} s, "
          f"real tok/s {summary['real_tokens_per_sec']:,.0f}, other CPU load "
          f"{100 * other:.0f}%", flush=True)
    return summary


# ---------------------------------------------------------------- long sequences, CP
class PeakMemory:
    """This process's peak resident memory (bytes) between ``__enter__`` and ``__exit__``:
    Linux's VmHWM after resetting it (``/proc/self/clear_refs``), else sampled every 2 ms."""

    def __enter__(self) -> "PeakMemory":
        import threading

        self.bytes, self._thread, self._done = 0, None, False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
        except OSError:
            def sample() -> None:
                while not self._done:
                    self.bytes = max(self.bytes, _status_bytes("VmRSS"))
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.bytes = _status_bytes("VmHWM")
        else:
            self._done = True
            self._thread.join()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(out_dir: str, argv: list[str]) -> None:
    """Under torchrun (``bench/train.py --probe OUT finetune flags...``): build the trainer,
    take one warm-up step, then measure the other ``--train_iters`` - 1 steps: resident
    memory before them and its peak during them, step times, tokens, losses. Each rank
    writes ``OUT/rank<R>.json``; no checkpoint, no evaluation."""
    import gc

    from megatron_ext.cli import setup_logging
    from megatron_ext.training.arguments import parse_config

    config = parse_config(argv)
    setup_logging()
    from megatron_ext.parallel import shutdown
    from megatron_ext.training.trainer import Trainer

    import torch.distributed as dist

    alltoall = [0.0]  # seconds in all-to-all exchanges (a mixture of experts' dispatcher)
    exchange = dist.all_to_all_single

    def timed_all_to_all_single(*args, **kwargs):
        start = time.perf_counter()
        try:
            return exchange(*args, **kwargs)
        finally:
            alltoall[0] += time.perf_counter() - start

    dist.all_to_all_single = timed_all_to_all_single
    trainer = Trainer(config)
    try:
        steps = [trainer.train_step()]
        gc.collect()
        before = _status_bytes("VmRSS")
        alltoall[0] = 0.0
        with PeakMemory() as peak:
            for _ in range(config.schedule.train_iters - 1):
                steps.append(trainer.train_step())
        keys = ("loss", "grad_norm", "iter_time", "tokens", "real_tokens")
        record = {"rank": trainer.layout.rank, "before": before, "peak": peak.bytes,
                  "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
                  "weights_bytes": sum(p.numel() * p.element_size()
                                       for p in trainer.model.parameters()),
                  "alltoall_seconds": alltoall[0],
                  "steps": [{k: step[k] for k in keys} for step in steps]}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"rank{trainer.layout.rank}.json"), "w",
                  encoding="utf-8") as handle:
            json.dump(record, handle)
    finally:
        shutdown()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state on this rank: Adam's moments and, beside a bf16/fp16 model,
    the fp32 main weights (megatron-core's plain or distributed optimizer; the latter
    holds this rank's shard of each)."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                total += sum(v.numel() * v.element_size()
                             for k, v in inner.optimizer.state.get(param, {}).items()
                             if k != "step")
                if getattr(inner.config, "bf16", False) or getattr(inner.config, "fp16", False):
                    total += param.numel() * param.element_size()  # an fp32 main copy
    return total


def run_probe(name: str, data: dict, args, workdir: str, cp: int,
              nproc: Optional[int] = None, extra: Sequence[str] = ()) -> dict:
    """One long-sequence run at context-parallel size ``cp`` (``cp`` processes); per-rank
    records of :func:`probe` summarised."""
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    nproc = nproc or cp
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(max(1, _cpus() // nproc)), PYTHONUNBUFFERED="1",
               MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors leave the resident set
    long_args = argparse.Namespace(**{**vars(args), "seq_length": args.long_seq_length,
                                      "micro_batch_size": 1, "iters": args.long_iters,
                                      "global_batch_size": args.long_global_batch_size})
    flags = train_args(data, long_args, os.path.join(out, "save"), "padded")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.abspath(__file__), "--probe", out,
               *flags, "--context_parallel_size", str(cp), *extra]
    start = time.perf_counter()
    logged_run(f"long-sequence run {name}", command, env, os.path.join(workdir, f"{name}.log"),
               args.timeout)
    ranks = []
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.json"), encoding="utf-8") as handle:
            ranks.append(json.load(handle))
    measured = ranks[0]["steps"][1:]
    seconds = sum(s["iter_time"] for s in measured)
    summary = {
        "ranks": cp,
        "activation": max(r["peak"] - r["before"] for r in ranks),
        "peak": max(r["peak"] for r in ranks),
        "before": max(r["before"] for r in ranks),
        "tokens_per_sec": sum(s["tokens"] for s in measured) / seconds,
        "iter_time": seconds / len(measured),
        "loss": ranks[0]["steps"][-1]["loss"],
        "optimizer_bytes": max(r["optimizer_bytes"] for r in ranks),
        "weights_bytes": max(r.get("weights_bytes", 0) for r in ranks),
        "alltoall_share": max(r.get("alltoall_seconds", 0.0) for r in ranks) / seconds,
    }
    print(f"  {name}: {time.perf_counter() - start:.1f} s with start-up, step "
          f"{summary['iter_time']:.2f} s, activation memory per rank "
          f"{summary['activation'] / 2**20:,.0f} MB", flush=True)
    return summary


def report_long(args, runs: dict) -> None:
    one, two = runs[1], runs[2]
    mb = 2 ** 20
    print()
    print(f"long sequences: rows of {args.long_seq_length} tokens, micro batch 1, global "
          f"batch {args.long_global_batch_size}, {args.num_layers} layers, hidden "
          f"{args.hidden_size}, {args.num_attention_heads}/{args.num_attention_heads_kv} heads; "
          f"{args.long_iters - 1} measured steps after 1 warm-up; per rank: the largest rank")
    header = (f"{'':<8}{'ranks':>6}{'activation MB':>15}{'peak MB':>10}{'before MB':>11}"
              f"{'tok/s':>9}{'step s':>9}{'loss':>10}")
    print(header)
    print("-" * len(header))
    for cp, run in runs.items():
        print(f"{'CP=' + str(cp):<8}{run['ranks']:>6}{run['activation'] / mb:>15,.0f}"
              f"{run['peak'] / mb:>10,.0f}{run['before'] / mb:>11,.0f}"
              f"{run['tokens_per_sec']:>9,.0f}{run['iter_time']:>9.2f}{run['loss']:>10.5f}")
    ratio = two["activation"] / one["activation"]
    print()
    print(f"ratio CP=2/CP=1 per rank: activation memory {ratio:.2f}, peak memory "
          f"{two['peak'] / one['peak']:.2f}; tokens/s (all ranks) "
          f"{two['tokens_per_sec'] / one['tokens_per_sec']:.2f}")
    print(f"final loss: CP=1 {one['loss']:.6f}  CP=2 {two['loss']:.6f}  (same batches: they "
          "should agree to ~1e-5)")
    verdict = "PASS" if ratio <= 1 - TARGET_CP_SAVING else "FAIL"
    print(f"{verdict} activation memory per rank at CP=2: {100 * (1 - ratio):.0f}% less than at "
          f"CP=1 (target: at least {100 * TARGET_CP_SAVING:.0f}%)")


def summarize(records: list[dict], warmup: int) -> dict:
    kept = [r for r in records if r["iteration"] > warmup]
    seconds = sum(r["iter_time"] for r in kept)
    return {
        "iters": len(kept),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in kept),
        "real_tokens_per_sec": statistics.median(r["real_tokens_per_sec"] for r in kept),
        "real_tokens_per_sec_total": sum(r["real_tokens_per_sec"] * r["iter_time"]
                                         for r in kept) / seconds,
        "padding_fraction": statistics.fmean(r["padding_fraction"] for r in kept),
        "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in kept),
        "data_wait_max": max(r["data_wait_fraction"] for r in kept),
        "iter_time": statistics.median(r["iter_time"] for r in kept),
        "data_ms": statistics.median(r["data_wait_fraction"] * r["iter_time"] * 1e3 for r in kept),
        "loss": records[-1]["loss"],
    }


def _row(name: str, s: dict) -> str:
    return (f"{name:<30}{s['tokens_per_sec']:>11,.0f}{s['real_tokens_per_sec']:>11,.0f}"
            f"{100 * s['padding_fraction']:>8.1f}{100 * s['data_wait_fraction']:>9.2f}"
            f"{s['data_ms']:>9.1f}{s['iter_time']:>9.3f}{100 * s['other_cpu']:>8.0f}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":  # a long-sequence run's process
        probe(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20,
                        help="training iterations per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="first iterations left out of the medians (default: %(default)s)")
    parser.add_argument("--seq_length", type=int, default=512,
                        help="training --seq_length and preprocessing --max_seq_length "
                             "(default: %(default)s)")
    parser.add_argument("--records", type=int, default=3000,
                        help="records in the generated corpus (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=1, choices=[1, 2],
                        help="torchrun --nproc_per_node: 1, or 2 for data parallel 2 "
                             "(default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of (a) and of (b), alternated; for each, the run with the "
                             "highest median real tokens/s is kept (default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help="keep corpus, tokenizer, data, logs, metrics.jsonl and checkpoints "
                             "here (default: a temporary directory, removed at the end)")
    parser.add_argument("--vocab_size", type=int, default=4000,
                        help="SentencePiece vocabulary asked for; the generated corpus has few "
                             "distinct words, so the trained one is smaller (default: %(default)s)")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--num_attention_heads_kv", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234,
                        help="corpus and training seed, the same for every run")
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds allowed per training run (default: %(default)s)")
    parser.add_argument("--long", action="store_true",
                        help="the long-sequence case instead: CP=1 vs CP=2 memory and tokens/s")
    parser.add_argument("--long_seq_length", type=int, default=4096,
                        help="--long: tokens per row, every row full (default: %(default)s)")
    parser.add_argument("--long_iters", type=int, default=4,
                        help="--long: steps per run, the first a warm-up (default: %(default)s)")
    parser.add_argument("--long_global_batch_size", type=int, default=2,
                        help="--long: rows per step, one per micro-batch (default: %(default)s)")
    parser.add_argument("--optimizer", action="store_true",
                        help="the optimizer case instead: optimizer-state bytes per rank at "
                             "DP=1 and with --use_distributed_optimizer at DP=2, and bf16 vs "
                             "fp32 step time")
    parser.add_argument("--smollm2", action="store_true",
                        help="the real-model case instead: SmolLM2-135M on the bundled sample, "
                             "packing per micro-batch against per epoch, FLOP/s against "
                             "torch.mm's")
    parser.add_argument("--smollm2_iters", type=int, default=3,
                        help="--smollm2: steps per run, the first a warm-up (default: "
                             "%(default)s)")
    parser.add_argument("--smollm2_repeat", type=int, default=1,
                        help="--smollm2: runs of each, alternated, the best kept (default: "
                             "%(default)s)")
    parser.add_argument("--smollm2_micro_batch_size", type=int, default=2)
    parser.add_argument("--smollm2_global_batch_size", type=int, default=4)
    parser.add_argument("--moe", action="store_true",
                        help="the mixture-of-experts case instead: EP=1 vs EP=2 on 2 "
                             "processes (memory and weights per rank, step time, the "
                             "all-to-all's share)")
    parser.add_argument("--moe_experts", type=int, default=8,
                        help="--moe: experts per layer (default: %(default)s)")
    parser.add_argument("--backend", choices=("megatron", "hf", "both"), default=None,
                        help="--smollm2: these training backends instead of the packing "
                             "comparison, each at DP=1 and DP=2, and the hf backend's "
                             "--compile (inductor) at DP=1")
    args = parser.parse_args()
    if args.moe:
        return main_moe(args)
    if args.optimizer:
        return main_optimizer(args)
    if args.backend and not args.smollm2:
        parser.error("--backend needs --smollm2 (the real model)")
    if args.smollm2:
        if args.smollm2_iters < 2:
            parser.error("--smollm2 needs --smollm2_iters >= 2")
        return main_backends(args) if args.backend else main_smollm2(args)
    if args.long:
        if args.long_iters < 2 or args.long_seq_length % 4:
            parser.error("--long needs --long_iters >= 2 and --long_seq_length a multiple of 4")
        return main_long(args)
    if args.iters <= args.warmup:
        parser.error(f"--iters {args.iters} must exceed --warmup {args.warmup}")
    if args.global_batch_size % (args.micro_batch_size * args.nproc):
        parser.error("--global_batch_size must be a multiple of --micro_batch_size x --nproc")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"preparing data in {workdir} ...", flush=True)
        data = prepare_data(workdir, args.records, args.seq_length, args.vocab_size, args.seed)
        print(f"training {args.num_layers} layers, hidden {args.hidden_size}, "
              f"{args.num_attention_heads}/{args.num_attention_heads_kv} heads, "
              f"seq {args.seq_length}, micro {args.micro_batch_size} / global "
              f"{args.global_batch_size}, {args.iters} iters, {args.nproc} proc x "
              f"{max(1, _cpus() // args.nproc)} thread(s), {args.repeat} run(s) each ...",
              flush=True)
        runs: dict[str, list[dict]] = {"a": [], "b": [], "c": [], "d": []}
        for number in range(1, args.repeat + 1):
            for key, mode in (("a", "padded"), ("b", "variable"), ("c", "packed"),
                              ("d", "dataset")):
                runs[key].append(run_training(f"{key}-{mode}-{number}", data, args, workdir,
                                              mode))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    padded, variable, packed, dataset = (max(runs[k], key=lambda r: r["real_tokens_per_sec"])
                                         for k in "abcd")

    lengths = data["meta"].get("lengths")
    header = (f"{'':<30}{'tok/s':>11}{'real tok/s':>11}{'pad %':>8}{'data %':>9}"
              f"{'data ms':>9}{'step s':>9}{'other %':>8}")
    print()
    if lengths:
        print(f"record lengths (tokens, after truncation): {json.dumps(lengths)}")
    print(f"medians over iterations {args.warmup + 1}..{args.iters} (pad %: mean); tok/s counts "
          f"padded positions; data %: global batch build / step; other %: CPU used by other "
          f"processes or stolen during the run; best of {args.repeat} run(s) each")
    print(header)
    print("-" * len(header))
    print(_row(f"(a) padded to {args.seq_length}", padded))
    print(_row("(b) --variable_seq_lengths", variable))
    print(_row("(c) + packing per micro-batch", packed))
    print(_row("(d) + --pack_sequences", dataset))
    print()
    for label, run, base in (("(b)/(a)", variable, padded), ("(c)/(a)", packed, padded),
                             ("(d)/(c)", dataset, packed)):
        ratio = run["real_tokens_per_sec"] / base["real_tokens_per_sec"]
        total_ratio = run["real_tokens_per_sec_total"] / base["real_tokens_per_sec_total"]
        print(f"ratio {label} real tokens/s: {ratio:.2f}  "
              f"(of totals over the same iterations: {total_ratio:.2f})")
    print(f"final loss: (a) {padded['loss']:.5f}  (b) {variable['loss']:.5f}  "
          f"(c) {packed['loss']:.5f}  (same batches, so they should agree to ~1e-5)")
    busy = max(r["other_cpu"] for r in runs["a"] + runs["b"] + runs["c"] + runs["d"])
    if busy > 0.10:
        print(f"note: other processes used up to {100 * busy:.0f}% of the CPUs during a run; "
              "times are unreliable, rerun on an idle machine or with --repeat 3")
    print(f"target: data wait < {100 * TARGET_DATA_WAIT:.0f}% of step time (median per run)")
    for name, s in (("(a) padded", padded), ("(b) variable", variable), ("(c) packed", packed),
                    ("(d) dataset", dataset)):
        verdict = "PASS" if s["data_wait_fraction"] < TARGET_DATA_WAIT else "FAIL"
        print(f"{verdict} data wait {name}: {100 * s['data_wait_fraction']:.2f}% of step time "
              f"(max {100 * s['data_wait_max']:.2f}%)")
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


# ---------------------------------------------------------------- SmolLM2, packing, FLOP/s
def matmul_rate(threads: int, seconds: float = 1.0) -> float:
    """``torch.mm``'s best fp32 rate (FLOP/s) with ``threads`` threads: SmolLM2's MLP
    products on a packed micro-batch (1024 x 576 @ 576 x 1536) and square 1024 ones."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def flops_per_real_token(log: str, lengths, seq_length: int) -> float:
    """Training FLOPs of one real token: 6 x the parameters (every weight is one matmul's,
    the tied output layer included; norms are negligible) plus attention's two products
    over the token's causal context in its record (3 x 2 x 2 x context x hidden per layer),
    averaged over the records' tokens. Parameters, layers and hidden size as the trainer
    logged them."""
    import re

    import numpy as np

    params = float(re.search(r"([\d.]+)M parameters", log).group(1)) * 1e6
    layers, hidden = map(int, re.search(r"(\d+) layers, hidden (\d+)", log).groups())
    n = np.minimum(np.asarray(lengths, dtype=np.float64) - 1, seq_length)
    context = float((n * (n + 1) / 2).sum() / n.sum())  # keys per query, token-weighted
    return 6 * params + 12 * layers * hidden * context


def epoch_padding(prefix: str, seq_length: int, micro_batch_size: int,
                  global_batch_size: int, per_epoch: bool) -> float:
    """Padding over the whole first epoch's global batches, as the trainer builds them
    (one process): packed per epoch (``per_epoch``) or per micro-batch. A few measured
    steps see a few batches; this is what a long run pays."""
    from megatron_ext.training.config import DataArgs
    from megatron_ext.training.data import BatchBuilder, build_splits

    split = build_splits(DataArgs(data_path=(prefix,), split="100,0,0"), 1234,
                         seq_length if per_epoch else None)["train"]
    builder = BatchBuilder(seq_length, 0, 0.0, True, micro_batch_size, 0, 1,
                           pack=not per_epoch)
    batches = [builder.global_batch(split, first, global_batch_size)
               for first in range(0, len(split) - global_batch_size + 1, global_batch_size)]
    return 1 - sum(b.real_tokens for b in batches) / sum(b.padded_tokens for b in batches)


def main_smollm2(args) -> None:
    wall = time.perf_counter()
    spec = importlib.util.spec_from_file_location(
        "bench_smollm2", os.path.join(REPO, "bench", "finetune_smollm2.py"))
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)
    from megatron_ext.data.indexed import sequence_lengths

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-smollm2-")
    os.makedirs(workdir, exist_ok=True)
    runs = {}
    try:
        print(f"importing SmolLM2 and preprocessing the sample in {workdir} ...", flush=True)
        gguf, cache, prefix = smollm2.prepare(workdir, args.seq_length)
        rates = [matmul_rate(_cpus())]
        print(f"torch.mm: {rates[0] / 1e9:,.1f} GFLOP/s; training {args.smollm2_iters} steps "
              f"of {args.smollm2_global_batch_size} samples (micro batch "
              f"{args.smollm2_micro_batch_size}, seq {args.seq_length}), before and after ...",
              flush=True)
        settings = argparse.Namespace(
            seq_length=args.seq_length, global_batch_size=args.smollm2_global_batch_size,
            iters=args.smollm2_iters, warmup=1, timeout=args.timeout)
        this = sys.modules[__name__]
        tries: dict[str, list[dict]] = {"before": [], "after": []}
        for number in range(1, args.smollm2_repeat + 1):  # alternated: a busy spell hits both
            for name, extra in (("before", ("--pack_scope", "micro_batch")), ("after", ())):
                tries[name].append(smollm2.run(
                    f"{name}-{number}", 1, gguf, cache, prefix, settings, workdir, this, extra,
                    micro_batch_size=args.smollm2_micro_batch_size))
        runs = {name: max(done, key=lambda r: r["real_tokens_per_sec"])
                for name, done in tries.items()}
        rates.append(matmul_rate(_cpus()))
        per_token = flops_per_real_token(runs["after"]["text"], sequence_lengths(prefix),
                                         args.seq_length)
        padding = {name: epoch_padding(prefix, args.seq_length, args.smollm2_micro_batch_size,
                                       args.smollm2_global_batch_size, name == "after")
                   for name in runs}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    limit = max(rates)
    print(f"\nSmolLM2-135M, data/sample at seq {args.seq_length}, 1 process x {_cpus()} "
          f"thread(s); torch.mm fp32 {limit / 1e9:,.1f} GFLOP/s (best of "
          f"{', '.join(f'{r / 1e9:,.1f}' for r in rates)}); model FLOPs per real token "
          f"{per_token / 1e9:.2f} G")
    header = (f"{'':<26}{'real tok/s':>11}{'pad %':>8}{'step s':>9}{'GFLOP/s':>9}"
              f"{'of mm':>8}{'other %':>9}{'epoch pad %':>12}{'epoch real tok/s':>17}")
    print(header)
    print("-" * len(header))
    for name, label in (("before", "packed per micro-batch"), ("after", "packed per epoch")):
        s = runs[name]
        achieved = s["real_tokens_per_sec"] * per_token
        print(f"{label:<26}{s['real_tokens_per_sec']:>11,.0f}"
              f"{100 * s['padding_fraction']:>8.1f}{s['iter_time']:>9.2f}"
              f"{achieved / 1e9:>9.1f}{100 * achieved / limit:>7.0f}%"
              f"{100 * s['other_cpu']:>9.0f}{100 * padding[name]:>12.1f}"
              f"{s['tokens_per_sec'] * (1 - padding[name]):>17,.0f}")
    gain = runs["after"]["real_tokens_per_sec"] / runs["before"]["real_tokens_per_sec"]
    epoch_gain = ((runs["after"]["tokens_per_sec"] * (1 - padding["after"]))
                  / (runs["before"]["tokens_per_sec"] * (1 - padding["before"])))
    verdict = "PASS" if min(gain, epoch_gain) >= TARGET_PACKING_GAIN else "FAIL"
    print(f"{verdict} after/before real tokens/s: {gain:.2f}x over the measured steps, "
          f"{epoch_gain:.2f}x at an epoch's padding (positions/s x (1 - epoch padding)); "
          f"target >= {TARGET_PACKING_GAIN}x")
    if max(s["other_cpu"] for s in runs.values()) > 0.10:
        print("note: other processes used over 10% of the CPUs during a run: times are noisy")
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


def main_backends(args) -> None:
    """``--smollm2 --backend``: the backends' real tokens/s and peak memory at DP=1 and
    DP=2, and the hf backend's compiled run (see the module's docstring)."""
    wall = time.perf_counter()
    spec = importlib.util.spec_from_file_location(
        "bench_smollm2", os.path.join(REPO, "bench", "finetune_smollm2.py"))
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)
    from megatron_ext.checkpointing.import_cache import ImportOptions, ensure_imported
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run

    backends = ("megatron", "hf") if args.backend == "both" else (args.backend,)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-backends-")
    os.makedirs(workdir, exist_ok=True)
    runs: dict[str, dict] = {}
    try:
        print(f"importing SmolLM2 and preprocessing the sample in {workdir} ...", flush=True)
        gguf, cache, prefix = smollm2.prepare(workdir, args.seq_length)
        settings = argparse.Namespace(
            seq_length=args.seq_length, global_batch_size=args.smollm2_global_batch_size,
            iters=args.smollm2_iters, warmup=1, timeout=args.timeout)
        this = sys.modules[__name__]
        micro = args.smollm2_micro_batch_size
        cases = []  # (name, nproc, load, cache, flags)
        if "megatron" in backends:
            cases += [(f"megatron-dp{n}", n, gguf, cache, ()) for n in (1, 2)]
        if "hf" in backends:
            cached = ensure_imported(gguf, cache, ImportOptions())
            tokenizer = tokenizer_config_from_run(cached.path, cached.run_config)
            model = os.path.join(workdir, "hf-model")
            if not os.path.isdir(model):
                subprocess.run([sys.executable, os.path.join(REPO, "tools", "megatron_to_hf.py"),
                                "--load", cached.path, "--out", model, "--no_progress"],
                               env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, check=True,
                               stdout=subprocess.DEVNULL)
            flags = ("--backend", "hf", "--tokenizer_type", tokenizer.tokenizer_type,
                     "--vocab_file", tokenizer.vocab_file)
            cases += [(f"hf-dp{n}", n, model, None, flags) for n in (1, 2)]
            cases.append(("hf-dp1-compiled", 1, model, None, (*flags, "--compile")))
        for name, nproc, load, cached_in, flags in cases:
            runs[name] = smollm2.run(name, nproc, load, cached_in, prefix, settings, workdir,
                                     this, flags, micro_batch_size=micro)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nSmolLM2-135M, data/sample at seq {args.seq_length}, packed per epoch, micro "
          f"batch {args.smollm2_micro_batch_size}, global batch "
          f"{args.smollm2_global_batch_size}, {args.smollm2_iters} steps (the first a "
          f"warm-up), {_cpus()} CPU(s); DP=2: 2 processes x {max(1, _cpus() // 2)} thread(s)")
    header = f"{'':<18}{'real tok/s':>11}{'step s':>9}{'peak MB':>9}{'loss':>9}{'other %':>9}"
    print(header)
    print("-" * len(header))
    for name, s in runs.items():
        print(f"{name:<18}{s['real_tokens_per_sec']:>11,.0f}{s['iter_time']:>9.2f}"
              f"{s['peak_mb']:>9,.0f}{s['loss']:>9.4f}{100 * s['other_cpu']:>9.0f}")

    def ratio(a: str, b: str, label: str) -> None:
        if a in runs and b in runs:
            speed = runs[a]["real_tokens_per_sec"] / runs[b]["real_tokens_per_sec"]
            print(f"{label}: real tokens/s {speed:.2f}x, peak memory "
                  f"{runs[a]['peak_mb'] / runs[b]['peak_mb']:.2f}x")

    for n in (1, 2):
        ratio(f"hf-dp{n}", f"megatron-dp{n}", f"hf / megatron at DP={n}")
    for backend in backends:
        ratio(f"{backend}-dp2", f"{backend}-dp1", f"{backend}: DP=2 / DP=1")
    ratio("hf-dp1-compiled", "hf-dp1", "hf: --compile (inductor) / eager at DP=1")
    if "hf-dp1-compiled" in runs and "hf-dp1" in runs:  # every logged step's train records
        compiled, eager = runs["hf-dp1-compiled"]["records"], runs["hf-dp1"]["records"]
        worst = [max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(compiled, eager))
                 for key in ("loss", "grad_norm")]
        print(f"hf: --compile (inductor) = eager over {len(eager)} steps: largest relative "
              f"difference {worst[0]:.1e} in the loss, {worst[1]:.1e} in the grad norm")
    if runs and max(s["other_cpu"] for s in runs.values()) > 0.10:
        print("note: other processes used over 10% of the CPUs during a run: times are noisy")
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


def main_long(args) -> None:
    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-long-")
    os.makedirs(workdir, exist_ok=True)
    records = 2 * args.long_iters * args.long_global_batch_size
    try:
        print(f"preparing {records} records of {args.long_seq_length} tokens in {workdir} ...",
              flush=True)
        data = prepare_data(workdir, args.records, args.long_seq_length, args.vocab_size,
                            args.seed, long_records=records)
        print(f"training at CP=1 (1 process x {_cpus()} threads) and CP=2 (2 processes x "
              f"{max(1, _cpus() // 2)} thread(s)) ...", flush=True)
        runs = {cp: run_probe(f"long-cp{cp}", data, args, workdir, cp) for cp in (1, 2)}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report_long(args, runs)
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


TARGET_DISTOPT_SHARE = 0.55  # optimizer state per rank at DP=2 (distributed) over DP=1's


def main_optimizer(args) -> None:
    """Optimizer-state bytes per rank: DP=1 vs DP=2 with --use_distributed_optimizer (the
    shard must be at most 0.55 of DP=1's: half, plus the buffers' padding), fp32 and
    bf16; and the step time of bf16 vs fp32 at DP=1 (recorded, no claim: on CPU bf16
    matmuls may well be slower). Padded rows of --seq_length, the probe's measured steps."""
    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-optimizer-")
    os.makedirs(workdir, exist_ok=True)
    probe_args = argparse.Namespace(**{**vars(args), "long_seq_length": args.seq_length,
                                       "long_iters": min(args.iters, 6),
                                       "long_global_batch_size": args.global_batch_size})
    cases = {"fp32 DP=1": (1, []), "fp32 DP=2 distributed": (2, ["--use_distributed_optimizer"]),
             "bf16 DP=1": (1, ["--bf16"]),
             "bf16 DP=2 distributed": (2, ["--bf16", "--use_distributed_optimizer"])}
    try:
        print(f"preparing data in {workdir} ...", flush=True)
        data = prepare_data(workdir, args.records, args.seq_length, args.vocab_size, args.seed)
        runs = {name: run_probe(name.replace(" ", "-").replace("=", ""), data, probe_args,
                                workdir, 1, nproc, flags)
                for name, (nproc, flags) in cases.items()}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    header = f"{'':<24}{'optimizer MB/rank':>19}{'step s':>9}{'tok/s':>9}{'loss':>10}"
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        print(f"{name:<24}{run['optimizer_bytes'] / 2**20:>19.2f}{run['iter_time']:>9.3f}"
              f"{run['tokens_per_sec']:>9,.0f}{run['loss']:>10.5f}")
    print()
    for precision in ("fp32", "bf16"):
        share = (runs[f"{precision} DP=2 distributed"]["optimizer_bytes"]
                 / runs[f"{precision} DP=1"]["optimizer_bytes"])
        verdict = "PASS" if share <= TARGET_DISTOPT_SHARE else "FAIL"
        print(f"{verdict} {precision}: optimizer state per rank at DP=2 (distributed) is "
              f"{share:.3f} of DP=1's (target: at most {TARGET_DISTOPT_SHARE})")
    print(f"bf16/fp32 step time at DP=1: "
          f"{runs['bf16 DP=1']['iter_time'] / runs['fp32 DP=1']['iter_time']:.2f} (recorded)")
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


TARGET_MOE_WEIGHTS_SHARE = 0.75  # --moe: parameters per rank at EP=2 over EP=1's


def main_moe(args) -> None:
    """A mixture of experts (Mixtral's layout, --moe_experts experts, top-2, the aux loss
    on) on two processes at EP=1 (each rank all the experts, data parallel) and EP=2 (each
    rank half of them, tokens exchanged by the alltoall dispatcher): per rank the peak and
    the weights' memory, the step time, and the all-to-all's share of the step (the time
    in ``torch.distributed.all_to_all_single``, measured in the probe). Same data, seed and
    schedule: the losses agree."""
    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-moe-")
    os.makedirs(workdir, exist_ok=True)
    probe_args = argparse.Namespace(**{**vars(args), "long_seq_length": args.seq_length,
                                       "long_iters": min(args.iters, 6),
                                       "long_global_batch_size": args.global_batch_size})
    moe = ["--model_name", "mixtral", "--num_experts", str(args.moe_experts),
           "--moe_router_topk", "2", "--moe_aux_loss_coeff", "0.01"]
    try:
        print(f"preparing data in {workdir} ...", flush=True)
        data = prepare_data(workdir, args.records, args.seq_length, args.vocab_size, args.seed)
        print(f"training {args.moe_experts} experts (top-2), {args.num_layers} layers, hidden "
              f"{args.hidden_size}, rows of {args.seq_length}, on 2 processes at EP=1 and "
              "EP=2 ...", flush=True)
        runs = {ep: run_probe(f"moe-ep{ep}", data, probe_args, workdir, 1, 2,
                              moe + ["--expert_model_parallel_size", str(ep)])
                for ep in (1, 2)}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    header = (f"{'':<8}{'weights MB/rank':>16}{'peak MB/rank':>14}{'step s':>9}"
              f"{'all-to-all %':>14}{'tok/s':>9}{'loss':>10}")
    print(header)
    print("-" * len(header))
    for ep, run in runs.items():
        print(f"{'EP=' + str(ep):<8}{run['weights_bytes'] / 2**20:>16.2f}"
              f"{run['peak'] / 2**20:>14,.0f}{run['iter_time']:>9.3f}"
              f"{100 * run['alltoall_share']:>14.1f}{run['tokens_per_sec']:>9,.0f}"
              f"{run['loss']:>10.5f}")
    one, two = runs[1], runs[2]
    share = two["weights_bytes"] / one["weights_bytes"]
    print()
    print(f"ratio EP=2/EP=1 per rank: weights {share:.2f}, peak memory "
          f"{two['peak'] / one['peak']:.2f}, step time {two['iter_time'] / one['iter_time']:.2f}")
    print(f"final loss: EP=1 {one['loss']:.6f}  EP=2 {two['loss']:.6f}  (same batches: they "
          "should agree to ~1e-5)")
    verdict = "PASS" if share <= TARGET_MOE_WEIGHTS_SHARE else "FAIL"
    print(f"{verdict} weights per rank at EP=2: {share:.2f} of EP=1's (target: at most "
          f"{TARGET_MOE_WEIGHTS_SHARE}; the experts are split, attention and embeddings not)")
    print(f"wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
