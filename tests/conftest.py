"""Shared fixtures: tokenizers trained on the fly, JSONL writers (no downloads), the
trainer tests' dataset and the one serial reference run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# a test never reaches Weights & Biases' servers: --wandb_project runs (the session's
# workers inherit this) keep their W&B run on disk
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread per process, here and in every process a test starts (the run_many workers
# and trainer launches already had it): the two sessions keep both cores busy, so a second
# OpenMP thread only contends; measured, OpenMP's threads spent ~2% of the suite's CPU
# spinning. (Set before torch is imported.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from megatron_ext import startup  # noqa: E402

# Collecting the tests imports torch, megatron-core and transformers: without full
# collections meanwhile, then frozen (megatron_ext/startup.py), as the entry points do.
startup.pause()

from instruct.preprocess_instruct_data import build_parser, config_from_args  # noqa: E402
from megatron_ext.data.preprocess import run_preprocess  # noqa: E402
from megatron_ext.tokenizers.training import (  # noqa: E402
    jsonl_texts,
    train_byte_level_bpe,
    train_sentencepiece,
)
from tests.runs import (  # noqa: E402
    CHATML,
    ITERS,
    Launch,
    close_pool,
    model_args,
    open_pool,
    start_early,
    start_runs,
    started,
    starts_early,
    train_metrics,
)

SAMPLE = REPO / "data" / "sample"
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

UNICODE_TEXTS = [
    "Grüße aus Köln! Ça va? ¿Qué tal?",
    "日本語のテキストと中文文本。",
    "Emoji 🤖🚀 and math ∑ x² ≤ ∞",
    "tabs\tand  double  spaces\nand\nnew lines",
]


def pytest_collection_finish(session) -> None:
    """The test modules are imported: what they imported is frozen, and the later full
    collections look at the tests' own objects only."""
    startup.settle()


def _corpus() -> list[str]:
    texts = list(jsonl_texts([SAMPLE / "training.jsonl"]))
    return texts + UNICODE_TEXTS * 5


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A Llama-2-like SentencePiece BPE model (byte fallback, identity normalization)."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    return train_sentencepiece(_corpus(), str(prefix), vocab_size=1500)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A Llama-3-like byte-level BPE tokenizer.json with its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("hf")
    train_byte_level_bpe(_corpus(), str(directory / "tokenizer.json"), vocab_size=1500,
                         special_tokens=("<|begin_of_text|>", "<|end_of_text|>"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return str(directory)


def write_jsonl(path: Path, records) -> Path:
    """Write records (dicts, or raw str/bytes lines written as they are)."""
    with open(path, "wb") as handle:
        for record in records:
            if isinstance(record, bytes):
                handle.write(record + b"\n")
            elif isinstance(record, str):
                handle.write(record.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def qa_records(n: int, seed: int = 0):
    """Varied question/answer records with unicode and some system prompts."""
    import random

    rng = random.Random(seed)
    words = ("alpha beta gamma delta epsilon the of model train answer question data "
             "Köln 日本 🤖 42 3.14 x²").split()
    out = []
    for i in range(n):
        record = {
            "question": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "?",
            "answer": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) + ".",
        }
        if i % 3 == 0:
            record["system"] = "You are a helpful assistant."
        out.append(record)
    return out


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


# ------------------------------------------------------------ nothing left running
SESSION_MARK = "MEGATRON_EXT_TEST_SESSION"


def _session_orphans(mark: str) -> list[tuple[int, str]]:
    """(pid, command) of the running processes that carry this session's mark in their
    environment, other than this process and its descendants (whose parent is gone)."""
    me, found = os.getpid(), []
    needle = f"{SESSION_MARK}={mark}".encode() + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle not in handle.read() + b"\0":
                    continue
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        state, parent = fields[0], int(fields[1])
        while parent not in (0, 1, me):  # a descendant of this process is not an orphan
            try:
                with open(f"/proc/{parent}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
        if state != "Z" and parent != me:
            found.append((int(name), command))
    return found


@pytest.fixture(scope="session")
def nothing_left_running():
    """At the end of the session no process that a test started is still running.

    Every process of the session inherits a mark in its environment; at the end, one
    still running whose parent is gone (a helper of a killed worker, say: issue
    "The house, second pass", item 10) is reported as a warning and killed."""
    if not os.path.isdir("/proc"):
        yield
        return
    mark = os.environ.setdefault(SESSION_MARK, str(os.getpid()))
    yield
    deadline = time.monotonic() + 5  # processes told to stop may still be on their way
    leftovers = _session_orphans(mark)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = _session_orphans(mark)
    for pid, _ in leftovers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if leftovers:
        warnings.warn("the test session left processes running (killed now): " + "; ".join(
            f"{pid} {command}" for pid, command in leftovers), stacklevel=1)


# ------------------------------------------------------------ shared training runs
# (here, not in a sub-directory conftest, so that each runs once per session)
@pytest.fixture(scope="session", autouse=True)
def run_many_workers(request, tmp_path_factory, nothing_left_running):
    """The session's run_many.py workers (tests/runs.py:Pool): started by the first batch
    that needs them, stopped at the end. Here, at the first test, the batches that the
    selected tests will wait for and that need nothing made by a test start early
    (tests/runs.py:starts_early), beside the in-process tests."""
    pool = open_pool(tmp_path_factory.mktemp("workers"))
    start_early(request)
    yield pool
    close_pool()


@pytest.fixture(scope="session")
def hf_tiny_llama(tmp_path_factory, sp_model) -> Path:
    """A tiny random Llama of 2 layers whose 1536 embedding rows are what the megatron
    backend pads the tokenizer's 1502 ids to: both backends train the same weights
    (tests/training/test_hf_backend.py). Session-wide: its runs start early, from the
    session's first test, wherever that is."""
    from tests.tools.conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("hf_backend") / "llama", sp_model,
                         num_hidden_layers=2, vocab_size=1536)


def _chatml_data(directory: Path, sp_model: str, tokenizer_flags: tuple[str, ...] = ()) -> dict:
    """The first 200 sample records as ChatML, truncated to 96 tokens."""
    lines = (SAMPLE / "training.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    source = directory / "train.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["--input", str(source), "--output_prefix", str(directory / "train"),
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
            "--vocab_extra_ids_list", ",".join(CHATML), "--question_key", "question",
            "--answer_key", "answer", "--system_key", "system", "--max_seq_length", "96",
            "--overlong", "truncate", "--workers", "1", "--no_progress", *tokenizer_flags]
    run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return {"prefix": str(directory / "train"), "vocab_file": sp_model,
            "tokenizer_flags": list(tokenizer_flags)}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, sp_model):
    """The first 200 sample records as ChatML (Megatron-LLM's SentencePiece id layout)."""
    return _chatml_data(tmp_path_factory.mktemp("train_data"), sp_model)


@pytest.fixture(scope="session")
def imported_train_data(tmp_path_factory, sp_model):
    """The same records tokenized as a pretrained model's own tokenizer.model: what a model
    imported with tools/hf_to_megatron.py trains on (no <CLS> <SEP> <EOD> <MASK> <PAD>)."""
    return _chatml_data(tmp_path_factory.mktemp("imported_train_data"), sp_model,
                        ("--no_megatron_llm_specials",))


def _start_serial(request, name: str, *flags: str) -> tuple[Launch, Path]:
    """A one-process run of the shared data with ``flags``, started early: (launch, run)."""
    out = request.getfixturevalue("tmp_path_factory").mktemp(name)
    train_data = request.getfixturevalue("train_data")
    launch = start_runs(1, [{"name": "serial", "argv": model_args(train_data, ITERS) + [
        *flags, "--save", str(out / "run")]}], out / "launch", early=True)
    return launch, out / "run"


def _finished_run(started_launch: tuple[Launch, Path]) -> Path:
    """The run of a :func:`_start_serial` launch, once it succeeded."""
    launch, run = started_launch
    result = launch.wait()["serial"]
    assert result.returncode == 0, result.log[-3000:]
    return run


@starts_early("reference_launch")
def start_reference(request) -> tuple[Launch, Path]:
    return _start_serial(request, "reference", "--save_interval", "3")


@pytest.fixture(scope="session")
def reference_launch(request) -> tuple[Launch, Path]:
    """The serial run every parity, resume and reshard test compares with: 6 iterations,
    one process, checkpoints at 3 and 6. Started early (``start_reference``), waited for
    by ``reference_run``."""
    return started("reference_launch", request)


@pytest.fixture(scope="session")
def reference_run(reference_launch) -> Path:
    return _finished_run(reference_launch)


@pytest.fixture(scope="session")
def reference(reference_run) -> list[dict]:
    return train_metrics(reference_run)


@starts_early("packed_reference_launch")
def start_packed_reference(request) -> tuple[Launch, Path]:
    return _start_serial(request, "packed_reference", "--pack_sequences")


@pytest.fixture(scope="session")
def packed_reference_launch(request) -> tuple[Launch, Path]:
    return started("packed_reference_launch", request)


@pytest.fixture(scope="session")
def packed_reference_run(packed_reference_launch) -> Path:
    """The serial run every packed parity and resume test compares with: the reference's
    flags and ``--pack_sequences`` (a sample is a packed row of up to 96 positions)."""
    return _finished_run(packed_reference_launch)


@pytest.fixture(scope="session")
def packed_reference(packed_reference_run) -> list[dict]:
    return train_metrics(packed_reference_run)
