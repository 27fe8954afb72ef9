"""Hugging Face models (and GGUF files) imported once, on the fly, for ``finetune.py --load``.

Why a cache: ``finetune.py --load HF_DIR`` starts from a Hugging Face model
without a separate ``tools/hf_to_megatron.py`` step, but what the trainer
loads at any TP/PP is the unsharded file set that the import writes.
Importing on every launch would read and write the whole model each time;
the cache keeps one import per source and import options, and reuses it
until the source changes.

An entry is ``<cache>/<model name>-<key>/``: exactly what
:func:`~megatron_ext.checkpointing.hf_import.import_hf` writes (weights,
``run_config.json`` with the model shape, ``tokenizer/``) plus
``import_source.json``, what the key was computed from. The key hashes

* the source's files: ``config.json``, the weight indexes and the tokenizer
  files by content (small, read whole); the weight files (and a GGUF file)
  by name, size and ``mtime_ns`` (too large to hash on every launch; a
  rewrite or a new download changes them);
* the import options that change the output: the extra tokens (their order
  sets their ids), the tokenizer type, another tokenizer's files, the dtype;
* :data:`IMPORT_FORMAT`, raised when the importer's output changes.

So an entry is never stale, only unused: a changed source gets a new key, and
the log names the older entry of the same source and what changed (that
entry stays, since another run may still read it; delete it by hand).

Several processes (torchrun's ranks, several nodes, several jobs) may ask
for the same entry at once. They coordinate through the file system only:
no process group exists yet, and an import of a large model outlasts a
collective's timeout.

* The first to take ``<entry>.lock`` (``flock``, which the kernel releases
  when its holder dies) imports; the others poll until the entry appears (or
  until they hold the lock, and then find the entry).
* The import is written to a private directory
  (``<entry>.importing.<host>.<pid>``, itself staged by ``UnshardedWriter``)
  and renamed to ``<entry>`` when complete. A crash leaves no entry, only the
  private directory, which the next importer on that host removes once its
  process is gone. Where ``flock`` does not reach across nodes, two nodes may
  import at once: the first rename wins and the other copy is dropped, so
  the worst case is duplicate work, never a mixed entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Optional

from megatron_ext.checkpointing.hf_import import TOKENIZER_FILES, ImportConfig, import_hf
from megatron_ext.checkpointing.run_config import load_run_config
from megatron_ext.checkpointing.unsharded import is_unsharded
from megatron_ext.errors import CheckpointError, UserError
from megatron_ext.io import (
    STAGING_SUFFIX,
    fsync_directory,
    process_alive,
    read_json,
    write_json,
)
from megatron_ext.tokenizers import canonical_tokenizer_type, file_sha256, parse_extra_ids

logger = logging.getLogger(__name__)

IMPORT_FORMAT = 1
"""Part of every key: raise it when ``import_hf`` writes something else for the same input."""
SOURCE_MANIFEST = "import_source.json"
LOCK_SUFFIX = ".lock"
HF_SUFFIX = ".hf"  # <entry>.hf: the entry as a Hugging Face model (a PEFT adapter's base)
_IMPORTING = ".importing."
# read whole for the key; weights only by size and mtime
_CONTENT_FILES = frozenset(("config.json", "model.safetensors.index.json",
                            "pytorch_model.bin.index.json", *TOKENIZER_FILES))
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WAIT_LOG_SECONDS = 300.0


@dataclass(frozen=True)
class ImportOptions:
    """The import settings that change what is written (each one is part of the key)."""

    vocab_extra_ids_list: Optional[str] = None
    tokenizer_type: Optional[str] = None  # None: the importer's choice (tokenizer.model, else HF)
    vocab_file: Optional[str] = None  # None: the model's own tokenizer
    dtype: Optional[str] = None  # None: the source's


@dataclass(frozen=True)
class CachedImport:
    """An entry of the cache, ready to load."""

    path: str
    key: str
    imported: bool  # by this call (False: reused)
    run_config: dict


def default_cache_dir(save: Optional[str]) -> str:
    """``<--save>/imported_models``; without ``--save``, ``$XDG_CACHE_HOME`` (else
    ``~/.cache``) ``/megatron-instruct/imports``.

    Why beside the run's checkpoints: an import is as large as the model, and
    ``--save`` is where room for several model-sized files is already planned
    (each checkpoint is larger, with its optimizer state). It is on the file
    system that every node of a multi-node run shares (its checkpoints need that
    too), not in a home directory whose quota a 70B model would exceed hours into
    a job; it goes away with the experiment, and relaunching the same command
    (after a crash, say) reuses it. Experiments from one base model share one
    import by naming the same ``--import_cache_dir``. A run without ``--save``
    keeps nothing of its own, so its import goes to the per-user cache, where the
    next such run finds it.
    """
    if save:
        return os.path.join(save, "imported_models")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-instruct", "imports")


# ---------------------------------------------------------------- the key
def _stat(path: str) -> dict:
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _tokenizer_files(path: str) -> dict:
    """A tokenizer given with ``--vocab_file`` (a file, or a directory of tokenizer files)
    by content."""
    if os.path.isfile(path):
        return {os.path.basename(path): file_sha256(path)}
    if not os.path.isdir(path):
        raise CheckpointError(f"--vocab_file {path} does not exist")
    return {name: file_sha256(os.path.join(path, name)) for name in sorted(TOKENIZER_FILES)
            if os.path.isfile(os.path.join(path, name))}


def describe_source(source: str, options: ImportOptions) -> dict:
    """What the key is computed from (see the module docstring), as JSON data; ``source``
    (the absolute path) is recorded but not hashed: a copy of a model shares its import."""
    path = os.path.abspath(source)
    files: dict[str, dict] = {}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            if name in _CONTENT_FILES:
                files[name] = {"sha256": file_sha256(file)}
            elif name.endswith(_WEIGHT_SUFFIXES):
                files[name] = _stat(file)
    elif os.path.isfile(path):
        files[os.path.basename(path)] = _stat(path)
    else:
        raise CheckpointError(f"--load {source} does not exist")
    return {
        "format": IMPORT_FORMAT,
        "source": path,
        "files": files,
        "options": {
            "extra_ids": list(parse_extra_ids(options.vocab_extra_ids_list)),
            "tokenizer_type": (canonical_tokenizer_type(options.tokenizer_type)
                               if options.tokenizer_type else None),
            "vocab_file": _tokenizer_files(options.vocab_file) if options.vocab_file else None,
            "dtype": options.dtype,
        },
    }


def cache_key(description: dict) -> str:
    hashed = {k: v for k, v in description.items() if k != "source"}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


def entry_name(source: str, key: str) -> str:
    """``<model directory or file name>-<key>``, the name made safe for any file system."""
    name = os.path.basename(os.path.normpath(os.path.abspath(source)))
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:64] or 'model'}-{key}"


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two descriptions of one source, in words."""
    found = []
    old_files, new_files = old.get("files") or {}, new["files"]
    for name in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(name), new_files.get(name)
        if before == after:
            continue
        if before is None or after is None:
            found.append(f"{name} {'added' if before is None else 'removed'}")
        else:
            what = [k for k in ("sha256", "size", "mtime_ns") if before.get(k) != after.get(k)]
            found.append(f"{name} ({', '.join('content' if k == 'sha256' else k for k in what)})")
    old_options = old.get("options") or {}
    found += [f"option {k}: {old_options.get(k)!r} -> {v!r}" for k, v in new["options"].items()
              if old_options.get(k) != v]
    if old.get("format") != new["format"]:
        found.append(f"import format {old.get('format')} -> {new['format']}")
    return found


def _explain_new_entry(root: str, entry: str, description: dict) -> None:
    """Log why ``entry`` is imported although the same source has cached imports: what
    changed since each (its files, or only the import options)."""
    for name in sorted(os.listdir(root)):
        manifest = os.path.join(root, name, SOURCE_MANIFEST)
        if name == os.path.basename(entry) or not os.path.isfile(manifest):
            continue
        try:
            old = read_json(manifest)
        except UserError:
            continue
        if old.get("source") != description["source"]:
            continue
        changes = _differences(old, description)
        if any(not change.startswith("option ") for change in changes):
            logger.info("%s changed since its import into %s (%s): a new key; that entry is "
                        "not used any more (delete it to free its space)", description["source"],
                        os.path.join(root, name), "; ".join(changes))
        else:
            logger.info("%s holds an import of %s with other options (%s): a new key",
                        os.path.join(root, name), description["source"], "; ".join(changes))


# ---------------------------------------------------------------- the entry
def _complete(entry: str) -> bool:
    """Whether ``entry`` is a published import (entries appear only by a rename of a
    complete one; anything else under the name was not made here)."""
    if not os.path.isdir(entry):
        return False
    if not is_unsharded(entry):
        raise CheckpointError(f"{entry} is in the import cache but holds no complete import; "
                              "delete it and run again")
    return True


@contextmanager
def _entry_lock(entry: str, announce: bool,
                complete: Callable[[str], bool] = _complete) -> Iterator[Optional[IO]]:
    """Hold ``<entry>.lock``; yields None instead when the entry was published meanwhile
    (by the holder, or by a process the lock does not reach; ``complete`` says)."""
    path = entry + LOCK_SUFFIX
    try:
        handle = open(path, "a")
    except OSError as exc:
        raise CheckpointError(f"cannot write the import cache {os.path.dirname(entry)} ({exc}); "
                              "choose another with --import_cache_dir") from None
    try:
        started, last_log = time.monotonic(), None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as exc:  # a file system without flock: the rename keeps it safe
                logger.warning("%s cannot be locked (%s); importing without the lock (a "
                               "concurrent import of the same model only repeats the work)",
                               path, exc)
                break
            if complete(entry):
                yield None
                return
            now = time.monotonic()
            if announce and (last_log is None or now - last_log >= _WAIT_LOG_SECONDS):
                logger.info("waiting for another process that imports into %s (it holds %s; "
                            "%.0f s so far)", entry, path, now - started)
                last_log = now
            time.sleep(0.2)
        yield handle
    finally:
        handle.close()  # releases the lock


def _remove_abandoned(entry: str) -> None:
    """Remove private import directories of ``entry`` left by dead processes of this host
    (processes of another host cannot be checked from here: theirs stay)."""
    root, base = os.path.split(entry)
    prefix, host = base + _IMPORTING, socket.gethostname()
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):]
        if owner.endswith(STAGING_SUFFIX):
            owner = owner[:-len(STAGING_SUFFIX)]
        owner_host, _, pid = owner.rpartition(".")
        if owner_host == host and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            logger.info("removed %s, left by an import that did not finish", name)


def _import(source: str, entry: str, options: ImportOptions, description: dict,
            progress: bool) -> None:
    """Import into a private directory, then rename it to ``entry`` (first rename wins)."""
    private = f"{entry}{_IMPORTING}{socket.gethostname()}.{os.getpid()}"
    try:
        summary = import_hf(ImportConfig(
            model_path=source, out=private, vocab_extra_ids_list=options.vocab_extra_ids_list,
            tokenizer_type=options.tokenizer_type, vocab_file=options.vocab_file,
            dtype=options.dtype, overwrite=True, progress=progress))
        write_json(os.path.join(private, SOURCE_MANIFEST), description)
        try:
            os.rename(private, entry)
        except OSError:
            if not _complete(entry):
                raise
            logger.info("%s was imported by another process meanwhile; using that copy", entry)
            shutil.rmtree(private, ignore_errors=True)
            return
        fsync_directory(os.path.dirname(entry))
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(private + STAGING_SUFFIX, ignore_errors=True)
        raise
    logger.info("imported %s into %s in %.1f s (%s, %d layers, %s, %.1f MiB)", source, entry,
                summary.seconds, summary.family, summary.layers, summary.dtype,
                summary.bytes / 2**20)


def ensure_imported(source: str, cache_dir: str, options: ImportOptions = ImportOptions(), *,
                    announce: bool = True, progress: bool = False) -> CachedImport:
    """The cache entry of ``source`` with ``options``: reused when present, else imported
    by this process or, when another holds the lock, by that one (this one waits).

    ``announce``: log reuse and waiting (the caller's rank 0); an import is always logged
    by the process that makes it.
    """
    description = describe_source(source, options)
    key = cache_key(description)
    root = os.path.abspath(cache_dir)
    entry = os.path.join(root, entry_name(source, key))
    if not _complete(entry):
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create the import cache {root} ({exc}); choose "
                                  "another with --import_cache_dir") from None
        with _entry_lock(entry, announce) as lock:
            if lock is not None and not _complete(entry):
                _explain_new_entry(root, entry, description)
                logger.info("importing %s into the cache %s (key %s)", source, entry, key)
                _remove_abandoned(entry)
                _import(source, entry, options, description, progress)
                return CachedImport(entry, key, True, load_run_config(entry))
    if announce:
        logger.info("%s: reusing its import cached in %s (key %s)", source, entry, key)
    return CachedImport(entry, key, False, load_run_config(entry))


# ---------------------------------------------------------------- the Hugging Face form
def is_cache_entry(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SOURCE_MANIFEST))


def _hf_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))  # published by a rename only


def ensure_hf_form(entry: str, export: Callable[[str], object]) -> tuple[str, bool]:
    """``<entry>.hf``, the entry as a Hugging Face model, written once by ``export(out)``
    (under its own lock, like the entry) and shared as the entry is: (path, made now).

    Why beside the entry: a PEFT adapter records its base as a model ``transformers``
    opens; for an import that is not its source as it is (a GGUF file, tokens added) that
    is this export, as large as the model, so experiments on one base share it."""
    out = entry + HF_SUFFIX
    if not _hf_complete(out):
        with _entry_lock(out, True, _hf_complete) as lock:
            if lock is not None and not _hf_complete(out):
                logger.info("writing the Hugging Face form of %s into %s", entry, out)
                export(out)
                return out, True
    logger.info("%s: reusing its Hugging Face form %s", entry, out)
    return out, False


# ---------------------------------------------------------------- a GGUF file's tokenizer
def _tokenizer_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer.json"))  # published by a rename only


def ensure_gguf_tokenizer(source: str, cache_dir: str) -> str:
    """The folder of the GGUF file ``source``'s own tokenizer (``tokenizer.json`` and its
    config, transformers' conversion, as an import writes them), written once into
    ``<cache_dir>/<name>-<key>.tokenizer`` (the key: the file's size and time) under a
    lock and shared by every rank and later run: what the hf backend, which reads the
    weights with transformers' ``gguf_file``, tokenizes with when no --vocab_file is given."""
    from megatron_ext.io import staged_directory
    from megatron_ext.models.gguf_checkpoint import GGUFModel

    path = os.path.abspath(source)
    key = cache_key({"format": "gguf-tokenizer", "files": {os.path.basename(path): _stat(path)}})
    root = os.path.abspath(cache_dir)
    out = os.path.join(root, entry_name(path, key) + ".tokenizer")
    if not _tokenizer_complete(out):
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create the import cache {root} ({exc}); choose "
                                  "another with --import_cache_dir") from None
        with _entry_lock(out, True, _tokenizer_complete) as lock:
            if lock is not None and not _tokenizer_complete(out):
                logger.info("writing the tokenizer of %s into %s", source, out)
                with staged_directory(out, overwrite=True) as staging:
                    GGUFModel(path).write_tokenizer(staging)
                return out
    logger.info("%s: reusing its tokenizer cached in %s", source, out)
    return out
