"""Outputs appear only when complete: a run that is killed, terminated or
interrupted never leaves a file named like a finished output, and never
damages a finished output set of the same prefix. Also the CLI surface:
``--help`` and the two spellings of every flag.

The kill tests start the real script (``--workers 2 --chunk_size 64``) on a
60,000-record input, wait until its temporary output files have grown, then
signal it. The four interrupted runs are started together by one module
fixture (so they share the wait) and each test checks its own run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import CHATML, REPO, qa_records, write_jsonl

from instruct.preprocess_instruct_data import build_parser, main
from megatron_ext.errors import DataError

SCRIPT = "instruct/preprocess_instruct_data.py"
OUTPUT_SUFFIXES = ("-text.bin", "-text.idx", "-role.bin", "-role.idx", "-meta.json")
BIG_RECORDS = 30_000  # written twice: 18 MB of JSONL, over 4 s of work for 2 idle workers
GROWN_BYTES = 64 * 1024  # the temporaries hold a few chunks: the run is mid-way
START_DEADLINE_S = 300  # imports + tokenizer + first chunks, on a loaded machine
EXIT_TIMEOUT_S = 90  # an interrupted run exits in about a second

FLAGS = (
    "--input", "--output_prefix", "--tokenizer_type", "--vocab_file", "--vocab_extra_ids_list",
    "--no_new_tokens", "--question_key", "--answer_key", "--system_key", "--messages_key",
    "--chat_format", "--prompt_template", "--max_seq_length", "--overlong", "--rejects_file",
    "--strict", "--workers", "--chunk_size", "--log_interval",
)


def tokenizer_flags(sp_model: str) -> list[str]:
    return ["--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
            "--vocab_extra_ids_list", ",".join(CHATML)]


QA_KEYS = ["--question_key", "question", "--answer_key", "answer", "--system_key", "system"]


def output_paths(prefix: str) -> list[Path]:
    return [Path(prefix + suffix) for suffix in OUTPUT_SUFFIXES]


def snapshot(prefix: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in output_paths(prefix)}


def run_in_process(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--workers", "1", *argv, "--no_progress"]) == 0
    return stdout.getvalue()


def temporary_bytes(prefix: str) -> int:
    total = 0
    for path in glob.glob(glob.escape(prefix) + "-*.tmp.*"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(path)
    return total


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids of processes (zombies excluded) still in process group ``pgid``."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


def describe_group(pgid: int) -> str:
    """``pid state wchan`` of each live process in group ``pgid`` (for a hang report)."""
    out = []
    for pid in live_processes_in_group(pgid):
        with contextlib.suppress(OSError):
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            out.append(f"{pid} {state} {wchan}")
    return ", ".join(out)


@dataclass
class InterruptedRun:
    """One CLI run and the signal that stops it mid-way."""

    signum: int
    to_group: bool  # Ctrl-C signals the whole foreground process group
    directory: Path
    proc: Optional[subprocess.Popen] = None
    temporary_bytes_at_signal: int = 0
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    leftovers: list[str] = field(default_factory=list)  # names in directory at the end
    live_group: list[int] = field(default_factory=list)  # processes left in its group
    hung: str = ""  # what its processes were doing, if it did not exit after the signal
    previous: dict[str, bytes] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return str(self.directory / "ds")

    def start(self, big_input: Path, sp_model: str, env: dict) -> None:
        command = [sys.executable, SCRIPT, "--input", str(big_input), "--output_prefix",
                   self.prefix, *tokenizer_flags(sp_model), *QA_KEYS,
                   "--workers", "2", "--chunk_size", "64"]
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: signals and cleanup reach workers
            # a shell may start background jobs with SIGINT ignored; a terminal user's doesn't
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def send(self) -> None:
        if self.to_group:
            os.killpg(self.proc.pid, self.signum)
        else:
            os.kill(self.proc.pid, self.signum)

    def finish(self) -> None:
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.hung = describe_group(self.proc.pid) or "(no process left)"
            self.kill_group()
            self.proc.wait()
        if self.signum == signal.SIGKILL:
            self.kill_group()  # the pool workers it orphaned
        self.stdout, self.stderr = self.proc.communicate(timeout=EXIT_TIMEOUT_S)
        self.returncode = self.proc.returncode
        deadline = time.monotonic() + 30
        self.live_group = live_processes_in_group(self.proc.pid)
        while self.live_group and time.monotonic() < deadline:
            time.sleep(0.05)
            self.live_group = live_processes_in_group(self.proc.pid)
        self.leftovers = sorted(os.listdir(self.directory))

    def assert_exited(self) -> None:
        assert not self.hung, (
            f"the run did not exit within {EXIT_TIMEOUT_S} s of "
            f"{signal.Signals(self.signum).name} and was killed; its processes were: {self.hung}")

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _interrupt_when_grown(runs: dict[str, InterruptedRun]) -> None:
    """Signal each run as soon as its temporary outputs hold a few chunks."""
    waiting = dict(runs)
    deadline = time.monotonic() + START_DEADLINE_S
    while waiting:
        for name, run in list(waiting.items()):
            if run.proc.poll() is not None:
                _, err = run.proc.communicate()
                pytest.fail(f"{name}: the run ended (exit {run.proc.returncode}) before it "
                            f"could be interrupted; make the input larger\n{err[-3000:]}")
            size = temporary_bytes(run.prefix)
            if size >= GROWN_BYTES:
                run.temporary_bytes_at_signal = size
                run.send()
                del waiting[name]
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"no temporary output grew to {GROWN_BYTES} bytes within "
                        f"{START_DEADLINE_S} s: {sorted(waiting)}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, sp_model) -> dict[str, InterruptedRun]:
    root = tmp_path_factory.mktemp("interrupted")
    big_input = write_jsonl(root / "big.jsonl", qa_records(BIG_RECORDS) * 2)
    env = dict(os.environ, PYTHONPATH=str(REPO))  # as the cli_env fixture (function-scoped)
    runs = {
        "sigkill": InterruptedRun(signal.SIGKILL, False, root / "sigkill"),
        "sigterm": InterruptedRun(signal.SIGTERM, False, root / "sigterm"),
        "sigint": InterruptedRun(signal.SIGINT, True, root / "sigint"),
        "sigkill_previous": InterruptedRun(signal.SIGKILL, False, root / "previous"),
    }
    for run in runs.values():
        run.directory.mkdir()
    try:
        for name in ("sigkill", "sigterm", "sigint"):
            runs[name].start(big_input, sp_model, env)
        # while those start: a complete output set for the last run to overwrite
        previous = runs["sigkill_previous"]
        small = write_jsonl(root / "small.jsonl", qa_records(50, seed=7))
        run_in_process(["--input", str(small), "--output_prefix", previous.prefix,
                        *tokenizer_flags(str(sp_model)), *QA_KEYS])
        previous.previous = snapshot(previous.prefix)
        previous.start(big_input, sp_model, env)

        _interrupt_when_grown(runs)
        for run in runs.values():
            run.finish()
    finally:
        for run in runs.values():
            if run.proc is not None and run.proc.poll() is None:
                run.kill_group()
                run.proc.wait()
    return runs


@pytest.mark.slow
def test_sigkill_leaves_no_complete_output(interrupted):
    run = interrupted["sigkill"]
    run.assert_exited()
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert run.temporary_bytes_at_signal >= GROWN_BYTES
    assert [name for name in run.leftovers if name.endswith(OUTPUT_SUFFIXES)] == []
    for path in output_paths(run.prefix):
        assert not path.exists()
    # what a kill -9 can leave is temporaries, which no reader takes for data
    assert all(".tmp." in name for name in run.leftovers), run.leftovers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sigterm", "sigint"])
def test_sigterm_and_sigint_clean_up_everything(interrupted, name):
    run = interrupted[name]
    # Pool workers reset SIGTERM to its default, so Pool.terminate() always stops them.
    run.assert_exited()
    assert run.temporary_bytes_at_signal >= GROWN_BYTES
    assert run.returncode != 0
    assert run.returncode == 130, run.stderr  # run_cli: 130 interrupted
    assert "interrupted: unfinished outputs were removed" in run.stderr
    assert "Preprocessing summary" not in run.stdout
    assert run.leftovers == []  # no outputs, no *.tmp.* files
    assert run.live_group == [], "pool workers outlived the interrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sigterm", "sigint"])
def test_interrupted_run_prints_no_traceback(interrupted, name):
    assert "Traceback" not in interrupted[name].stderr


@pytest.mark.slow
def test_previous_output_survives_a_killed_run(interrupted):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run = interrupted["sigkill_previous"]
    run.assert_exited()
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert run.temporary_bytes_at_signal >= GROWN_BYTES
    assert sorted(run.previous) == sorted(path.name for path in output_paths(run.prefix))
    assert snapshot(run.prefix) == run.previous  # byte-identical
    assert all(name in run.previous or ".tmp." in name for name in run.leftovers), run.leftovers
    meta = json.loads(Path(run.prefix + "-meta.json").read_text())
    assert meta["counts"]["records_out"] == 50
    assert len(IndexedDataset(run.prefix + "-text")) == len(IndexedDataset(run.prefix + "-role")) \
        == 50


@pytest.mark.parametrize("bad_lines, extra", [
    (['{"input": "q", "output": "a"}'] * 3, []),  # every record rejected
    (['{"question": "q", "answer": "a"}', "{broken"], ["--strict"]),
])
def test_previous_output_survives_a_failed_run(tmp_path, sp_model, bad_lines, extra):
    prefix = str(tmp_path / "ds")
    good = write_jsonl(tmp_path / "good.jsonl", qa_records(20))
    run_in_process(["--input", str(good), "--output_prefix", prefix,
                    *tokenizer_flags(sp_model), *QA_KEYS])
    before = snapshot(prefix)
    bad = write_jsonl(tmp_path / "bad.jsonl", bad_lines)
    with pytest.raises(DataError), contextlib.redirect_stdout(io.StringIO()):
        main(["--input", str(bad), "--output_prefix", prefix, *tokenizer_flags(sp_model),
              *QA_KEYS, "--no_progress", "--workers", "1", *extra])
    assert snapshot(prefix) == before
    assert [name for name in os.listdir(tmp_path) if ".tmp." in name] == []


def test_help_mentions_every_flag(cli_env):
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for flag in FLAGS:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), flag
    # flags are shown in snake_case; the kebab-case spelling is announced once
    assert "spelled with - for _" in proc.stdout


def _kebab(snake_argv: list[str]) -> list[str]:
    return [arg.replace("_", "-") if arg.startswith("--") else arg for arg in snake_argv]


def test_every_flag_parses_the_same_in_kebab():
    argv = ["--input", "a.jsonl", "b.jsonl.gz", "--output_prefix=out/ds",
            "--tokenizer_type", "HFTokenizer", "--vocab_file", "tok/",
            "--vocab_extra_ids_list", "<|a|>,<|b|>", "--no_new_tokens",
            "--question_key", "q", "--answer_key", "a", "--system_key", "s",
            "--messages_key", "m", "--chat_format", "llama3",
            "--prompt_template", "U: {input}\\nA: {output}", "--dataset_impl", "mmap",
            "--max_seq_length", "128", "--overlong", "truncate", "--rejects_file", "r.jsonl",
            "--strict", "--workers", "3", "--chunk_size", "7", "--log_interval", "11",
            "--no_progress"]
    kebab = _kebab(argv)
    assert kebab != argv and "--output-prefix=out/ds" in kebab and "--vocab-file" in kebab
    snake_args = build_parser().parse_args(argv)
    assert vars(snake_args) == vars(build_parser().parse_args(kebab))
    assert snake_args.new_tokens is False and snake_args.strict is True
    assert snake_args.progress is False and snake_args.chunk_size == 7
    assert snake_args.input == ["a.jsonl", "b.jsonl.gz"]


def test_both_spellings_give_identical_outputs(tmp_path, sp_model):
    records = qa_records(40, seed=3)
    records[5] = {"question": "long " * 500, "answer": "short"}  # prompt over the limit
    records[9] = {"question": "Why?", "answer": "because " * 500}  # truncated
    lines = [*records[:20], "{not json", *records[20:]]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    outputs = {}
    for spelling in ("snake", "kebab"):
        directory = tmp_path / spelling
        directory.mkdir()
        argv = ["--input", str(source), "--output_prefix", str(directory / "ds"),
                *tokenizer_flags(sp_model), *QA_KEYS, "--chat_format", "chatml",
                "--max_seq_length", "320", "--overlong", "truncate",
                "--rejects_file", str(directory / "rejects.jsonl"),
                "--workers", "1", "--chunk_size", "8", "--log_interval", "10"]
        if spelling == "kebab":
            argv = _kebab(argv)
            assert "--output-prefix" in argv and "--vocab-file" in argv
        summary = run_in_process(argv)
        assert "records truncated" in summary
        outputs[spelling] = {**snapshot(str(directory / "ds")),
                             "rejects": (directory / "rejects.jsonl").read_bytes()}
    assert outputs["snake"] == outputs["kebab"]
    meta = json.loads(outputs["snake"]["ds-meta.json"])
    assert meta["counts"]["truncated"] == 1
    assert meta["counts"]["rejected_by_reason"] == {"malformed_json": 1, "too_long": 1}
