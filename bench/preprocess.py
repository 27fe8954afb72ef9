#!/usr/bin/env python3
"""Preprocessor throughput against the bare tokenizer, measured in one run.

What it does:
1. generates a corpus (default 100,000 records) with instruction-like length
   distributions (log-normal questions and answers, a long tail, system
   prompts on a third, some unicode), deterministically from a seed;
2. trains a Llama-style SentencePiece tokenizer on a slice of it (or uses
   ``--vocab_file``);
3. (a) baseline: the bare tokenizer encodes the same texts (every system,
   question and answer string) in ``--workers`` processes, each with its share
   already in memory, timed from a common start barrier: the most any
   preprocessor built on this tokenizer could reach;
4. (b) the full preprocessor (``run_preprocess``: reading, JSON parsing,
   validation, chat formatting, tokenizing, writing .bin/.idx and meta.json)
   with the same number of workers;
5. (b) again on a fifth of the corpus, to show that peak memory does not grow
   with the corpus.

It prints docs/s, MB/s, tokens/s and peak RSS (parent + workers) for each, and
the ratio (b)/(a). Each measurement runs in a fresh subprocess; RSS is sampled
from outside every 20 ms. The machine is noisy: compare ratios, not times.

  python bench/preprocess.py                      # 100k records, 2 workers
  python bench/preprocess.py --records 20000 --workers 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which "
         "model data training answer question explain result because however example number "
         "function value system language people time first world city river country history "
         "science energy water music market policy court health school theory method process "
         "Köln café naïve résumé über 東京 北京 данные модель παράδειγμα 🤖 🚀 ∑ √ x² 42 3.14 "
         "2024 100 7").split()
SYSTEM_PROMPTS = ["You are a helpful assistant.",
                  "You are a concise expert. Answer in at most three sentences.",
                  "Réponds en français, s'il te plaît."]


def _text(rng: random.Random, mean_words: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(mean_words), sigma))))
    words = rng.choices(WORDS, k=n)
    out, line = [], []
    for word in words:
        line.append(word)
        if rng.random() < 0.06:
            out.append(" ".join(line) + rng.choice([".", ":", "?", ","]))
            line = []
    out.append(" ".join(line) + ".")
    return ("\n" if rng.random() < 0.3 else " ").join(out)


def generate_corpus(path: str, records: int, seed: int = 1234) -> int:
    """Write ``records`` JSONL lines; returns the file size."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(records):
            record = {"question": _text(rng, 40, 0.9, 1500), "answer": _text(rng, 120, 1.0, 3000)}
            if index % 3 == 0:
                record["system"] = rng.choice(SYSTEM_PROMPTS)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return os.path.getsize(path)


# ---------------------------------------------------------------- measurements
def _baseline_worker(args):
    vocab_file, tokenizer_type, texts, barrier = args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tokenizer_type == "SentencePieceTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=vocab_file)
        encode = lambda batch: sp.encode(batch, num_threads=1)  # noqa: E731
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(vocab_file)
        encode = lambda batch: [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]  # noqa: E731
    barrier.wait()
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1024):
        tokens += sum(map(len, encode(texts[i:i + 1024])))
    return start, time.perf_counter(), tokens


def measure_baseline(corpus: str, vocab_file: str, tokenizer_type: str, workers: int) -> dict:
    import multiprocessing as mp

    texts, nbytes, records = [], 0, 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            nbytes += len(line.encode("utf-8"))
            records += 1
            texts.extend(record[k] for k in ("system", "question", "answer") if k in record)
    shares = [texts[i::workers] for i in range(workers)]
    context = mp.get_context("fork")
    barrier = context.Manager().Barrier(workers)
    with context.Pool(workers) as pool:
        results = pool.map(_baseline_worker,
                           [(vocab_file, tokenizer_type, share, barrier) for share in shares],
                           chunksize=1)
    seconds = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    return {"seconds": seconds, "records": records, "bytes": nbytes,
            "tokens": sum(t for _, _, t in results)}


def measure_full(corpus: str, vocab_file: str, tokenizer_type: str, workers: int, out: str) -> dict:
    from megatron_ext.data.encode import EncodeConfig
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_ext.data.records import RecordKeys
    from megatron_ext.tokenizers import TokenizerConfig

    config = PreprocessConfig(
        inputs=(corpus,), output_prefix=out, workers=workers, chunk_size=256, progress=False,
        encode=EncodeConfig(
            tokenizer=TokenizerConfig(tokenizer_type, vocab_file, ("<|im_start|>", "<|im_end|>")),
            keys=RecordKeys("question", "answer", "system"), chat_format="chatml"),
    )
    start = time.perf_counter()
    summary = run_preprocess(config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records": summary.stats.records_in, "bytes": summary.stats.bytes_in,
            "tokens": int(summary.stats.role_tokens.sum())}


def run_measurement(kind: str, argv: list[str]) -> dict:
    """Run one measurement in a fresh process, sampling its tree's peak RSS."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--measure", kind, *argv],
                            stdout=subprocess.PIPE, text=True)
    peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"measurement {kind} failed with exit code {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def _row(name: str, r: dict) -> str:
    s = r["seconds"]
    return (f"{name:<34}{r['records'] / s:>11,.0f}{r['bytes'] / 1e6 / s:>9.1f}"
            f"{r['tokens'] / s:>13,.0f}{r['peak_rss_mb']:>10.0f}{s:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab_file", default=None, help="tokenizer to use instead of training one")
    parser.add_argument("--tokenizer_type", default="SentencePieceTokenizer")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--workdir", default=None, help="keep corpus and outputs here")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of (a) and (b), alternated; the best of each is kept")
    parser.add_argument("--measure", choices=["baseline", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        if args.measure == "baseline":
            result = measure_baseline(args.corpus, args.vocab_file, args.tokenizer_type, args.workers)
        else:
            result = measure_full(args.corpus, args.vocab_file, args.tokenizer_type, args.workers,
                                  args.out)
        print(json.dumps(result))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    os.makedirs(workdir, exist_ok=True)
    try:
        run_bench(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_bench(args, workdir: str) -> None:
    corpus = os.path.join(workdir, "corpus.jsonl")
    small = os.path.join(workdir, "corpus-small.jsonl")
    print(f"generating {args.records:,} records in {workdir} ...", flush=True)
    size = generate_corpus(corpus, args.records)
    generate_corpus(small, max(1, args.records // 5))
    vocab_file = args.vocab_file
    if vocab_file is None:
        from megatron_ext.tokenizers.training import jsonl_texts, train_sentencepiece

        print(f"training a {args.vocab_size}-token SentencePiece tokenizer ...", flush=True)
        texts = []
        for text in jsonl_texts([small]):
            texts.append(text)
            if len(texts) >= 20000:
                break
        vocab_file = train_sentencepiece(texts, os.path.join(workdir, "tokenizer"), args.vocab_size)
    common = ["--vocab_file", vocab_file, "--tokenizer_type", args.tokenizer_type,
              "--workers", str(args.workers)]
    print(f"measuring with {args.workers} worker(s) on {size / 1e6:.0f} MB ...", flush=True)
    baselines, fulls = [], []
    for _ in range(max(1, args.repeat)):
        baselines.append(run_measurement("baseline", [*common, "--corpus", corpus]))
        fulls.append(run_measurement("full", [*common, "--corpus", corpus,
                                              "--out", os.path.join(workdir, "big")]))
    baseline = min(baselines, key=lambda r: r["seconds"])
    full = min(fulls, key=lambda r: r["seconds"])
    full_small = run_measurement("full", [*common, "--corpus", small,
                                          "--out", os.path.join(workdir, "small")])

    header = f"{'':<34}{'docs/s':>11}{'MB/s':>9}{'tokens/s':>13}{'RSS MB':>10}{'sec':>9}"
    print()
    print(header)
    print("-" * len(header))
    print(_row(f"(a) bare tokenizer, {args.workers} proc", baseline))
    print(_row(f"(b) preprocessor, {args.workers} workers", full))
    print(_row(f"(b) on {full_small['records']:,} records", full_small))
    ratio = (full["records"] / full["seconds"]) / (baseline["records"] / baseline["seconds"])
    print()
    print(f"ratio (b)/(a) docs/s: {ratio:.2f}   (target >= 0.85; best of {args.repeat} runs each)")
    print(f"peak RSS, {full['records']:,} vs {full_small['records']:,} records: "
          f"{full['peak_rss_mb']:.0f} MB vs {full_small['peak_rss_mb']:.0f} MB "
          f"(x{full['peak_rss_mb'] / full_small['peak_rss_mb']:.2f} for x"
          f"{full['records'] / full_small['records']:.0f} the data)")


if __name__ == "__main__":
    main()
