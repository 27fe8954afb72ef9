"""The offline preprocessor: JSONL records to ``{prefix}-text/-role`` + meta.json.

Why it is shaped this way: the parent process only reads raw lines, hands
bounded chunks to a worker pool, and writes results in input order with one
call per chunk; workers do all parsing, formatting and tokenizing. Memory
stays flat (at most ``2 x workers`` chunks in flight), ``--workers 1`` and
``--workers N`` write byte-identical files, and bad lines are rejected with
their file and line instead of stopping a night's run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from megatron_ext import __version__
from megatron_ext.cli import ProgressBar, option
from megatron_ext.data.chat_formats import build_chat_format
from megatron_ext.data.encode import (
    ChunkResult,
    EncodeConfig,
    Encoder,
    Reject,
    encode_chunk_in_worker,
    init_worker,
)
from megatron_ext.data.indexed import AtomicDatasetOutputs, text_dtype_for
from megatron_ext.data.records import (
    ROLE_IDS,
    LineChunk,
    expand_inputs,
    iter_chunks,
    resolve_record_keys,
)
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.io import AtomicFile
from megatron_ext.tokenizers import build_tokenizer

logger = logging.getLogger(__name__)

META_FORMAT_VERSION = 1
EXAMPLES_IN_SUMMARY = 5


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...] = option(
        help="JSONL files or globs (.jsonl or .jsonl.gz), read in the order given",
        names=("--input",), metavar="PATH")
    output_prefix: str = option(help="output path prefix; writes PREFIX-text.bin/.idx, "
                                     "PREFIX-role.bin/.idx and PREFIX-meta.json")
    encode: EncodeConfig
    workers: int = option(1, "tokenizer processes; output is identical for any number")
    chunk_size: int = option(256, "records per task sent to a worker (default: %(default)s)")
    log_interval: int = option(10000, "records between progress lines when not on a terminal "
                                      "(default: %(default)s)")
    rejects_file: Optional[str] = option(
        None, "write every rejected line as JSONL {file, line, code, reason, text}")
    strict: bool = option(False, "stop with an error at the first bad record instead of "
                                 "skipping it")
    max_rejected_fraction: Optional[float] = option(
        None, "stop with an error (nothing written) when more than this fraction of the "
              "records is rejected, e.g. 0.01 (default: no limit; the rejects are reported)")
    progress: bool = option(True, "no progress bar")

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ConfigError(f"--chunk_size must be at least 1, got {self.chunk_size}")
        limit = self.encode.max_seq_length
        if limit is not None and limit < 2:
            raise ConfigError(f"--max_seq_length must be at least 2, got {limit}")
        fraction = self.max_rejected_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise ConfigError(f"--max_rejected_fraction must be between 0 and 1, got {fraction}")
        if self.encode.overlong not in ("drop", "truncate"):
            raise ConfigError(f"--overlong must be drop or truncate, got {self.encode.overlong!r}")
        out_dir = os.path.dirname(os.path.abspath(self.output_prefix))
        if not os.path.isdir(out_dir):
            raise ConfigError(
                f"output directory {out_dir} does not exist: create it (mkdir -p {out_dir}) "
                "or change --output_prefix"
            )
        if not os.access(out_dir, os.W_OK):
            raise ConfigError(f"output directory {out_dir} is not writable")
        if self.rejects_file:
            rejects_dir = os.path.dirname(os.path.abspath(self.rejects_file))
            if not os.path.isdir(rejects_dir):
                raise ConfigError(f"--rejects_file: directory {rejects_dir} does not exist "
                                  f"(mkdir -p {rejects_dir})")
        if os.path.basename(self.output_prefix) in ("", ".", ".."):
            raise ConfigError(f"--output_prefix {self.output_prefix!r} needs a file name part")


class LengthHistogram:
    """Exact length statistics in memory proportional to the longest record."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        binned = np.bincount(lengths)
        if len(binned) > len(self.counts):
            binned[: len(self.counts)] += self.counts
            self.counts = binned
        else:
            self.counts[: len(binned)] += binned

    def summary(self) -> dict:
        total = int(self.counts.sum())
        if total == 0:
            return {}
        values = np.arange(len(self.counts))
        cumulative = np.cumsum(self.counts)

        def pct(q: float) -> int:
            return int(np.searchsorted(cumulative, q * total, side="left"))

        nonzero = np.nonzero(self.counts)[0]
        return {
            "min": int(nonzero[0]),
            "max": int(nonzero[-1]),
            "mean": round(float((values * self.counts).sum() / total), 2),
            "p50": pct(0.5),
            "p90": pct(0.9),
            "p99": pct(0.99),
        }


@dataclass
class PreprocessStats:
    records_in: int = 0
    records_out: int = 0
    truncated: int = 0
    bytes_in: int = 0
    role_tokens: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    rejected_by_code: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    lengths: LengthHistogram = field(default_factory=LengthHistogram)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_code.values())

    def add(self, result: ChunkResult) -> None:
        self.records_in += result.lines
        self.records_out += len(result.lengths)
        self.truncated += result.truncated
        self.bytes_in += result.nbytes
        self.role_tokens += np.bincount(result.roles, minlength=3)[:3]
        self.lengths.add(result.lengths)


@dataclass
class PreprocessSummary:
    config: PreprocessConfig
    stats: PreprocessStats
    meta: dict
    elapsed: float
    files: dict[str, str]

    def table(self) -> str:
        s = self.stats
        tokens = int(s.role_tokens.sum())
        rate = s.records_in / self.elapsed if self.elapsed else 0.0
        rows = [
            ("records read", f"{s.records_in:,}"),
            ("records written", f"{s.records_out:,}"),
            ("records rejected", f"{s.rejected:,}"),
            ("records truncated", f"{s.truncated:,}"),
            ("tokens", f"{tokens:,}"),
            ("  system / user / assistant",
             " / ".join(f"{int(n):,}" for n in s.role_tokens)),
        ]
        lengths = self.meta["lengths"]
        if lengths:
            rows.append(("tokens per record",
                         f"min {lengths['min']}, mean {lengths['mean']}, p50 {lengths['p50']}, "
                         f"p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']}"))
        rows += [
            ("time", f"{self.elapsed:.1f} s ({rate:,.0f} records/s, "
                     f"{s.bytes_in / 1e6 / max(self.elapsed, 1e-9):.1f} MB/s, "
                     f"{tokens / max(self.elapsed, 1e-9):,.0f} tokens/s)"),
        ]
        for key in ("text_bin", "role_bin", "meta"):
            rows.append((key.replace("_", " "), self.files[key]))
        width = max(len(k) for k, _ in rows)
        lines = ["Preprocessing summary", "-" * (width + 40)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        if s.rejected:
            lines.append("rejected by reason:")
            for code, count in s.rejected_by_code.most_common():
                lines.append(f"  {code:<{width}}{count:,}")
            lines.append("first rejected records:")
            lines += [f"  {example}" for example in s.examples]
            if not self.config.rejects_file:
                lines.append("  (--rejects_file FILE writes every rejected line with its reason)")
        return "\n".join(lines)


class _RejectsLog:
    """Collects rejects; writes them to ``--rejects_file`` as JSONL (atomic rename)."""

    def __init__(self, path: Optional[str], files: list[str]):
        self.path, self.files = path, files
        self.target = AtomicFile(path) if path else None

    def write(self, reject: Reject) -> None:
        if self.target is not None:
            record = {
                "file": self.files[reject.file_index],
                "line": reject.line,
                "code": reject.code,
                "reason": reject.message,
                "text": reject.raw.decode("utf-8", errors="replace").rstrip("\r\n"),
            }
            self.target.handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self, keep: bool) -> None:
        """Publish the file (a finished run, or the --strict stop it explains) or drop it."""
        if self.target is not None:
            if keep:
                self.target.commit()
            else:
                self.target.discard()
            self.target = None


@contextlib.contextmanager
def _worker_pool(config: PreprocessConfig):
    """A process pool, or None for ``--workers 1`` (encode in this process)."""
    if config.workers == 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # an executor, not multiprocessing.Pool: a worker killed (e.g. by the OOM
    # killer) breaks it loudly, where a Pool would wait for that task forever
    executor = concurrent.futures.ProcessPoolExecutor(
        config.workers, mp_context=multiprocessing.get_context(method),
        initializer=init_worker, initargs=(config.encode,))
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _ordered_results(pool, encoder: Encoder, chunks: Iterable[LineChunk],
                     workers: int) -> Iterator[ChunkResult]:
    """Encode chunks in input order, with at most 2 x workers chunks in flight."""
    if pool is None:
        for chunk in chunks:
            yield encoder.encode_chunk(chunk)
        return
    pending: collections.deque = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(encode_chunk_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a worker process died (out of memory, or killed); nothing was written. "
                        "Use fewer --workers or a smaller --chunk_size") from None


class _Progress:
    """tqdm on a terminal; elsewhere a line every ``--log_interval`` records, and (unless
    --no_progress) the shared plain lines: bytes done, elapsed, ETA, every 30 s and at the
    end."""

    def __init__(self, config: PreprocessConfig, total_bytes: Optional[int]):
        self.interval = max(1, config.log_interval)
        self.next_log = self.interval
        self.start = time.monotonic()
        self.bar = ProgressBar(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                            enabled=config.progress, log=logger)

    def update(self, stats: PreprocessStats, result: ChunkResult) -> None:
        self.bar.set_postfix(records=f"{stats.records_in:,}", rejected=stats.rejected)
        self.bar.update(result.nbytes)
        if not self.bar.terminal and stats.records_in >= self.next_log:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            logger.info("processed %d records (%.0f records/s, %.1f MB/s), %d rejected",
                        stats.records_in, stats.records_in / elapsed,
                        stats.bytes_in / 1e6 / elapsed, stats.rejected)
            self.next_log += self.interval

    def close(self) -> None:
        self.bar.close()


def _raise_on_sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise KeyboardInterrupt(f"signal {signum}")


def run_preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run the whole preprocessing; raises :class:`UserError` subclasses on bad input."""
    config.validate()
    files = expand_inputs(config.inputs)
    keys = resolve_record_keys(config.encode.keys, files)
    config = dataclasses.replace(config, encode=dataclasses.replace(config.encode, keys=keys))
    tokenizer = build_tokenizer(config.encode.tokenizer)
    chat_format = build_chat_format(config.encode.chat_format, tokenizer,
                                    config.encode.prompt_template)
    chat_format.check()
    if config.encode.keys.system and config.encode.prompt_template is not None \
            and not chat_format.has_system:
        raise ConfigError("--system_key is set but --prompt_template has no {system} placeholder")
    encoder = Encoder(config.encode, tokenizer)
    plain = [f for f in files if not f.endswith(".gz")]
    total_bytes = sum(os.path.getsize(f) for f in files) if len(plain) == len(files) else None

    stats = PreprocessStats()
    progress = _Progress(config, total_bytes)
    rejects = _RejectsLog(config.rejects_file, files)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    start = time.monotonic()
    keep_rejects = False
    try:
        with _worker_pool(config) as pool:
            text_dtype = text_dtype_for(tokenizer.vocab_size)
            with AtomicDatasetOutputs(config.output_prefix, text_dtype) as outputs:
                chunks = iter_chunks(files, config.chunk_size)
                for result in _ordered_results(pool, encoder, chunks, config.workers):
                    _record_rejects(config, files, result, stats, rejects)
                    stats.add(result)
                    outputs.add(result.tokens, result.roles, result.lengths)
                    progress.update(stats, result)
                if stats.records_out == 0:
                    detail = "; ".join(stats.examples) or "the input is empty"
                    raise DataError(
                        f"no record was accepted out of {stats.records_in} ({detail}); check "
                        "--question_key/--answer_key/--messages_key against your JSONL keys"
                    )
                if config.max_rejected_fraction is not None:
                    keep_rejects = True  # the rejects file lists what to fix
                    check_rejected_fraction(", ".join(files), stats.records_in, stats.rejected,
                                            stats.examples, config.max_rejected_fraction,
                                            config.rejects_file)
                meta = build_meta(config, files, tokenizer, chat_format, stats, text_dtype)
                outputs.commit(meta)
                keep_rejects = True
    except DataError:
        # the rejects file shows the line that stopped the run, or the lines to fix
        keep_rejects = config.strict or keep_rejects
        raise
    finally:
        progress.close()
        rejects.close(keep_rejects)
        signal.signal(signal.SIGTERM, previous_sigterm)
    return PreprocessSummary(config, stats, meta, time.monotonic() - start, outputs.paths)


def check_rejected_fraction(what: str, records_in: int, rejected: int, examples: list[str],
                            limit: float, rejects_file: Optional[str]) -> None:
    """A :class:`DataError` when more than ``limit`` of ``records_in`` were rejected: the
    file(s), the count, the fraction, the first reasons and the two ways out."""
    if records_in == 0 or rejected / records_in <= limit:
        return
    where = (f"every rejected line with its reason is in {rejects_file}" if rejects_file
             else "--rejects_file FILE lists every rejected line with its reason")
    raise DataError(
        f"{what}: {rejected} of {records_in} records rejected ({rejected / records_in:.1%}), "
        f"more than --max_rejected_fraction {limit:g}; the first: {'; '.join(examples)}. "
        f"Fix those records ({where}; a record too long for the length limit needs a larger "
        "one), or raise --max_rejected_fraction to train without them")


def _record_rejects(config: PreprocessConfig, files: list[str], result: ChunkResult,
                    stats: PreprocessStats, rejects: _RejectsLog) -> None:
    """Count and log a chunk's rejects; with ``--strict`` the first one stops the run."""
    for reject in result.rejects:
        where = f"{files[reject.file_index]}:{reject.line}"
        rejects.write(reject)
        if config.strict:
            raise DataError(
                f"{where}: {reject.message} (--strict stops at the first bad record; "
                "without it bad records are skipped, counted and reported)"
            )
        stats.rejected_by_code[reject.code] += 1
        if len(stats.examples) < EXAMPLES_IN_SUMMARY:
            stats.examples.append(f"{where}: {reject.message}")


def build_meta(config, files, tokenizer, chat_format, stats: PreprocessStats, text_dtype) -> dict:
    """The ``{prefix}-meta.json`` contract (deterministic: no times, no hosts)."""
    keys = config.encode.keys
    tokens = {name: int(stats.role_tokens[index]) for name, index in ROLE_IDS.items()}
    return {
        "format_version": META_FORMAT_VERSION,
        "tool": "megatron_ext.preprocess_instruct_data",
        "tool_version": __version__,
        "tokenizer": tokenizer.identity(),
        "chat_format": {
            "name": chat_format.name,
            "prompt_template": config.encode.prompt_template,
            "stop_token": chat_format.stop_token,
            **chat_format.meta(),
        },
        "keys": {"question": keys.question, "answer": keys.answer, "system": keys.system,
                 "messages": keys.messages, "context": keys.context},
        "max_seq_length": config.encode.max_seq_length,
        "overlong": config.encode.overlong,
        "inputs": [{"path": path, "bytes": os.path.getsize(path)} for path in files],
        "roles": dict(ROLE_IDS),
        "dtypes": {"text": np.dtype(text_dtype).name, "role": "uint8"},
        "counts": {
            "records_in": stats.records_in,
            "records_out": stats.records_out,
            "rejected": stats.rejected,
            "truncated": stats.truncated,
            "rejected_by_reason": dict(sorted(stats.rejected_by_code.items())),
        },
        "tokens": {"total": int(stats.role_tokens.sum()), **tokens},
        "lengths": stats.lengths.summary(),
    }
