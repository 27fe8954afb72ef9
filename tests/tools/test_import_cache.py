"""The import cache behind ``finetune.py --load HF_DIR``, in-process: reuse, new keys for
changed sources and options, the cached tokenizer's identity, crashes, concurrency, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_ext.checkpointing import import_cache
from megatron_ext.checkpointing.import_cache import (
    SOURCE_MANIFEST,
    ImportOptions,
    cache_key,
    default_cache_dir,
    describe_source,
    ensure_imported,
    entry_name,
)
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.unsharded import MARKER, UnshardedReader
from megatron_ext.errors import CheckpointError
from megatron_ext.tokenizers import (
    HUGGINGFACE,
    SENTENCEPIECE,
    TokenizerConfig,
    build_tokenizer,
    parse_extra_ids,
)
from tests.conftest import CHATML

EXTRA = ",".join(CHATML)
LOGGER = "megatron_ext.checkpointing.import_cache"


@pytest.fixture
def source(tmp_path, hf_llama) -> Path:
    """A private copy of the tiny Llama (tests change its files)."""
    return Path(shutil.copytree(hf_llama, tmp_path / "llama"))


def entry_of(source: Path, cache: Path, options: ImportOptions) -> Path:
    return cache / entry_name(str(source), cache_key(describe_source(str(source), options)))


def listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_reused_while_unchanged_and_reimported_when_a_file_changes(tmp_path, source, caplog):
    cache, options = tmp_path / "cache", ImportOptions(EXTRA)
    caplog.set_level(logging.INFO, LOGGER)
    first = ensure_imported(str(source), str(cache), options)
    assert first.imported and Path(first.path) == entry_of(source, cache, options)
    marker = Path(first.path) / MARKER
    made = marker.stat().st_mtime_ns
    assert json.loads((Path(first.path) / SOURCE_MANIFEST).read_text())["source"] == str(source)

    caplog.clear()
    second = ensure_imported(str(source), str(cache), options)
    assert not second.imported and second.path == first.path
    assert marker.stat().st_mtime_ns == made
    assert "using its import cached in" in caplog.text and "importing" not in caplog.text

    # a rewritten weight file (same size, new mtime) gives a new key, and the log says why
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    caplog.clear()
    third = ensure_imported(str(source), str(cache), options)
    assert third.imported and third.path != first.path
    assert (f"changed since its import into {first.path} (model.safetensors (mtime_ns))"
            in caplog.text)

    # config.json by content: a changed value under the same size and mtime still counts
    config = source / "config.json"
    before = config.stat()
    text = config.read_text()
    config.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    assert config.read_text() != text
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    caplog.clear()
    fourth = ensure_imported(str(source), str(cache), options)
    assert fourth.imported and fourth.path not in (first.path, third.path)
    assert "config.json (content)" in caplog.text
    assert fourth.run_config["model"]["layernorm_epsilon"] == 2e-05
    # nothing but the entries and their lock files
    assert [n for n in listing(cache) if not n.endswith(".lock")] == sorted(
        Path(p).name for p in (first.path, third.path, fourth.path))


def test_import_options_are_part_of_the_key(tmp_path, source, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, LOGGER)
    base = ensure_imported(str(source), str(cache), ImportOptions(EXTRA))
    swapped = ensure_imported(str(source), str(cache),
                              ImportOptions(",".join(reversed(CHATML))))
    assert swapped.imported and swapped.path != base.path
    assert f"{base.path} holds an import of {source} with other options" in caplog.text
    # the order of the extra tokens sets their ids: the two imports differ
    a, b = (build_tokenizer(tokenizer_config_from_run(p.path, p.run_config)).special_tokens
            for p in (base, swapped))
    assert (a["<|im_start|>"], a["<|im_end|>"]) == (b["<|im_end|>"], b["<|im_start|>"])
    assert a["<|im_start|>"] != b["<|im_start|>"]
    # spelling of the same options gives the same key; the dtype gives another
    same = ensure_imported(str(source), str(cache), ImportOptions(" <|im_start|>, <|im_end|>"))
    assert not same.imported and same.path == base.path
    bf16 = ensure_imported(str(source), str(cache), ImportOptions(EXTRA, dtype="bf16"))
    assert bf16.imported and UnshardedReader(bf16.path).meta["dtype"] == "bfloat16"
    # an explicit tokenizer is keyed by its content (here: the model's own, given by path)
    given = ensure_imported(str(source), str(cache), ImportOptions(
        EXTRA, SENTENCEPIECE, str(source / "tokenizer.model")))
    assert given.imported and given.path != base.path


@pytest.mark.parametrize("model, kind, vocab_file", [
    ("hf_llama", SENTENCEPIECE, "tokenizer.model"),
    ("hf_llama_bpe", HUGGINGFACE, ""),
])
def test_cached_tokenizer_has_the_identity_of_the_source_tokenizer(request, tmp_path, model,
                                                                    kind, vocab_file):
    """Data made from the model directory (``--vocab_file HF_DIR[/tokenizer.model]``) passes
    the trainer's tokenizer check against the cache's copy: equal identities."""
    source = Path(request.getfixturevalue(model))
    cached = ensure_imported(str(source), str(tmp_path / "cache"), ImportOptions(EXTRA))
    own = tokenizer_config_from_run(cached.path, cached.run_config)
    assert own.tokenizer_type == kind and own.vocab_file.startswith(cached.path)
    extra = parse_extra_ids(EXTRA)
    # the model's own ids (a tokenizer.model without Megatron-LLM's additions)
    original = build_tokenizer(TokenizerConfig(kind, str(source / vocab_file), extra,
                                               megatron_llm_specials=False))
    copy = build_tokenizer(own)
    assert copy.identity() == original.identity()
    assert cached.run_config["tokenizer_identity"] == original.identity()


def test_a_failed_import_leaves_no_entry_and_abandoned_ones_are_removed(tmp_path, source,
                                                                         monkeypatch):
    cache, options = tmp_path / "cache", ImportOptions(EXTRA)
    real = import_cache.import_hf

    def killed_after_writing(config):
        real(config)  # the private copy is complete; the rename never comes
        raise KeyboardInterrupt

    monkeypatch.setattr(import_cache, "import_hf", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        ensure_imported(str(source), str(cache), options)
    entry = entry_of(source, cache, options)
    assert listing(cache) == [entry.name + ".lock"]

    # what kill -9 leaves: private directories of dead processes of this host (removed) and
    # of another host (kept: its process cannot be checked from here)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left = [f"{entry.name}.importing.{host}.{dead.pid}",
            f"{entry.name}.importing.{host}.{dead.pid}.incomplete"]
    elsewhere = f"{entry.name}.importing.other-host.{dead.pid}"
    for name in left + [elsewhere]:
        (cache / name).mkdir()
    monkeypatch.setattr(import_cache, "import_hf", real)
    cached = ensure_imported(str(source), str(cache), options)
    assert cached.imported and Path(cached.path) == entry
    assert listing(cache) == sorted([entry.name, entry.name + ".lock", elsewhere])


def test_concurrent_requests_import_once(tmp_path, source, monkeypatch, caplog):
    """The second caller waits for the lock holder's import and reuses it (threads: each
    opens the lock file itself, so flock separates them as it separates processes)."""
    cache, options = tmp_path / "cache", ImportOptions(EXTRA)
    caplog.set_level(logging.INFO, LOGGER)
    real, calls = import_cache.import_hf, []
    started, release = threading.Event(), threading.Event()

    def slow_import(config):
        calls.append(config.out)
        started.set()
        assert release.wait(60)
        return real(config)

    monkeypatch.setattr(import_cache, "import_hf", slow_import)
    results = {}

    def request(name):
        results[name] = ensure_imported(str(source), str(cache), options)

    first = threading.Thread(target=request, args=("first",))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=request, args=("second",))
    second.start()
    deadline = time.monotonic() + 30
    while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.is_alive() and "waiting for another process" in caplog.text
    release.set()
    first.join(60)
    second.join(60)
    assert len(calls) == 1
    assert results["first"].imported and not results["second"].imported
    assert results["first"].path == results["second"].path


def test_default_cache_dir(tmp_path, monkeypatch):
    assert default_cache_dir("runs/sft") == os.path.join("runs/sft", "imported_models")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir(None) == str(tmp_path / "megatron-instruct" / "imports")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir(None) == str(tmp_path / "home" / ".cache" / "megatron-instruct"
                                          / "imports")


def test_bad_sources_and_caches_are_clear_errors(tmp_path, source):
    options = ImportOptions(EXTRA)
    with pytest.raises(CheckpointError, match="--load .*missing.gguf does not exist"):
        ensure_imported(str(tmp_path / "missing.gguf"), str(tmp_path / "cache"), options)
    with pytest.raises(CheckpointError, match="--vocab_file .*nothing does not exist"):
        ensure_imported(str(source), str(tmp_path / "cache"),
                        ImportOptions(EXTRA, vocab_file=str(tmp_path / "nothing")))
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError,
                       match="cannot create the import cache .*--import_cache_dir"):
        ensure_imported(str(source), str(tmp_path / "file" / "cache"), options)
    # something else under an entry's name is not taken for an import
    entry = entry_of(source, tmp_path / "cache", options)
    entry.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete import; delete it"):
        ensure_imported(str(source), str(tmp_path / "cache"), options)
