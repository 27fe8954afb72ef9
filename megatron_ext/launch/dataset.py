"""The dataset folder, tokenized once: splits found, a cache keyed by content, counts.

Why a cache keyed by content: tokenizing a large instruction set takes long and
its result depends only on the input files, the tokenizer, the chat format and
the length limit. Each tokenization lives in ``EXPERIMENTS_DIR/.tokenized/KEY/``
(KEY hashes those), written under a private name and renamed when complete, so
every experiment with the same inputs reuses it and a changed file gets a new one.
A folder that already holds preprocessed ``.bin/.idx`` splits is used as it is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.indexed import read_meta
from megatron_ext.data.records import RecordKeys, resolve_record_keys
from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers import TokenizerConfig, file_sha256

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")  # file stems, in order; training is required
# other names of the splits, refused with a message that names them (never read silently
# as a split, nor silently ignored)
SPLIT_ALIASES = {"training": ("train",), "validation": ("val", "valid", "dev", "eval"),
                 "test": ("testing",)}
MISSING_SPLIT = {
    "validation": "no validation split ({name}): no validation loss during training, only "
                  "the training loss",
    "test": "no test split ({name}): the model is not evaluated after training (it is "
            "still exported)",
}
REJECTS_SHOWN = 5  # rejected records printed per split (all of them are in a file)
FORMAT = 1


@dataclass(frozen=True)
class DataSource:
    """What ``--dataset_path`` holds: JSONL files or preprocessed prefixes, per split."""

    kind: str  # jsonl | preprocessed
    paths: dict[str, str]  # split -> JSONL file, or split -> prefix
    notes: tuple[str, ...] = ()  # the optional splits that are missing, and what that means


@dataclass(frozen=True)
class TokenizedData:
    key: Optional[str]  # the cache key (None for a preprocessed folder used as it is)
    prefixes: dict[str, str]  # split -> prefix
    records: dict[str, int]  # split -> records written
    made_now: bool  # tokenized by this launch (False: found in the cache)


def find_splits(dataset_path: str) -> DataSource:
    if not os.path.isdir(dataset_path):
        raise ConfigError(f"--dataset_path {dataset_path} is not a folder")

    def jsonl_file(stem: str) -> Optional[str]:
        for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
            if os.path.isfile(os.path.join(dataset_path, name)):
                return name
        return None

    jsonl = {split: os.path.join(dataset_path, name) for split in SPLITS
             if (name := jsonl_file(split))}
    misnamed = [(split, found) for split in SPLITS if split not in jsonl
                for found in map(jsonl_file, SPLIT_ALIASES[split]) if found]
    if misnamed:
        raise ConfigError(
            f"--dataset_path {dataset_path} holds "
            + ", ".join(f"{found} (rename it {split}{found[found.index('.'):]})"
                        for split, found in misnamed)
            + ": the splits are read from training.jsonl, validation.jsonl and test.jsonl "
              "(.jsonl.gz too) only")
    if "training" in jsonl:
        return DataSource("jsonl", jsonl, _missing_splits(jsonl, ".jsonl"))
    prefixes = {split: os.path.join(dataset_path, split) for split in SPLITS
                if os.path.isfile(os.path.join(dataset_path, f"{split}-text.idx"))}
    if "training" in prefixes:
        return DataSource("preprocessed", prefixes, _missing_splits(prefixes, "-text.bin/.idx"))
    raise ConfigError(
        f"--dataset_path {dataset_path} has no training.jsonl (nor a preprocessed "
        "training-text.bin/.idx): put the training records there as JSONL, one per line "
        "(validation.jsonl and test.jsonl are optional)")


def _missing_splits(found: dict, suffix: str) -> tuple[str, ...]:
    return tuple(text.format(name=f"{split}{suffix}") for split, text in MISSING_SPLIT.items()
                 if split not in found)


def record_keys(source: DataSource, given: RecordKeys) -> RecordKeys:
    """The record keys of the JSONL splits: detected from their first records unless given
    (checked against them then), so a format error comes before any model is imported."""
    if source.kind != "jsonl":
        return given
    return resolve_record_keys(given, list(source.paths.values()))


def report_rejects(data: TokenizedData, source: DataSource, out_dir: str,
                   limit: Optional[float]) -> None:
    """Each split's rejected records: the first ones logged with file:line and reason, all
    of them copied to ``out_dir/SPLIT.jsonl``; more than ``limit`` of a split rejected is
    an error (None: no check)."""
    from megatron_ext.data.preprocess import check_rejected_fraction
    from megatron_ext.io import atomic_write

    for split, prefix in data.prefixes.items():
        counts = read_meta(prefix)["counts"]
        if not counts["rejected"]:
            continue
        rejects = f"{prefix}-rejects.jsonl"  # written by tokenize() (none in older caches)
        examples, kept = [], None
        if os.path.isfile(rejects):
            kept = os.path.join(out_dir, f"{split}.jsonl")
            os.makedirs(out_dir, exist_ok=True)
            with open(rejects, "rb") as src, atomic_write(kept, "wb", None) as dst:
                shutil.copyfileobj(src, dst)
            with open(rejects, encoding="utf-8") as handle:
                for line in itertools.islice(handle, REJECTS_SHOWN):
                    row = json.loads(line)
                    examples.append(f"{row['file']}:{row['line']}: {row['reason']}")
        records = counts["records_in"]
        logger.warning("%s: %d of %d records rejected (%.1f%%)%s%s", split, counts["rejected"],
                       records, 100 * counts["rejected"] / max(records, 1),
                       "".join(f"\n  {example}" for example in examples),
                       f"\n  (all of them, with their reasons: {kept})" if kept else "")
        if limit is not None:
            check_rejected_fraction(source.paths[split], records, counts["rejected"], examples,
                                    limit, kept)


def cache_key(source: DataSource, tokenizer_identity: dict, encode: dict) -> str:
    """The files' content, the tokenizer's identity and the encoding settings, hashed."""
    files = {split: {"name": os.path.basename(path), "sha256": file_sha256(path)}
             for split, path in source.paths.items()}
    payload = {"format": FORMAT, "files": files, "tokenizer": tokenizer_identity,
               "encode": encode}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def count_lines(path: str) -> int:
    """Non-empty lines of a JSONL file (a dry run's estimate of the records)."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def tokenize(source: DataSource, cache_root: str, tokenizer: TokenizerConfig,
             tokenizer_identity: dict, chat_format: str, prompt_template: Optional[str],
             keys: dict, seq_length: int, workers: int, progress: bool) -> TokenizedData:
    """The splits of ``source`` tokenized (from the cache when there), with their counts."""
    if source.kind == "preprocessed":
        records = {split: int(read_meta(prefix)["counts"]["records_out"])
                   for split, prefix in source.paths.items()}
        return TokenizedData(None, dict(source.paths), records, False)
    encode = {"chat_format": chat_format, "prompt_template": prompt_template, "keys": keys,
              "max_seq_length": seq_length, "overlong": "truncate"}
    key = cache_key(source, tokenizer_identity, encode)
    final = os.path.join(cache_root, key)
    made_now = not os.path.isfile(os.path.join(final, "done.json"))
    if made_now:
        _tokenize_into(final, source, tokenizer, encode, workers, progress)
    else:
        logger.info("tokenized data found in the cache: %s", final)
    prefixes = {split: os.path.join(final, split) for split in source.paths}
    records = {split: int(read_meta(prefix)["counts"]["records_out"])
               for split, prefix in prefixes.items()}
    return TokenizedData(key, prefixes, records, made_now)


def _tokenize_into(final: str, source: DataSource, tokenizer: TokenizerConfig, encode: dict,
                   workers: int, progress: bool) -> None:
    from megatron_ext.data.encode import EncodeConfig
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_ext.io import write_json

    staging = f"{final}.incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        for split, path in source.paths.items():
            logger.info("tokenizing %s (%s)", path, split)
            summary = run_preprocess(PreprocessConfig(
                inputs=(path,), output_prefix=os.path.join(staging, split),
                rejects_file=os.path.join(staging, f"{split}-rejects.jsonl"),
                encode=EncodeConfig(tokenizer=tokenizer, keys=RecordKeys(**encode["keys"]),
                                    chat_format=encode["chat_format"],
                                    prompt_template=encode["prompt_template"],
                                    max_seq_length=encode["max_seq_length"],
                                    overlong=encode["overlong"]),
                workers=workers, progress=progress))
            counts = summary.meta["counts"]
            logger.info("%s: %d records (%d rejected, %d truncated)", split,
                        counts["records_out"], counts["rejected"], counts["truncated"])
        write_json(os.path.join(staging, "done.json"), {"format": FORMAT, "encode": encode})
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.isdir(final):  # a concurrent launch finished the same key first
            shutil.rmtree(staging)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
