"""The local executor: ``torchrun`` on this node, its output shown and kept in a log.

Why a subprocess, not in-process training: the launcher outlives the run (to
evaluate and export after it) and must stay light; torchrun gives the workers
their ranks, single node or several (``--nnodes``/``--node_rank``/
``--master_addr``, the same command on every node).
"""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ext.cli import ProgressBar, on_terminal


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torchrun_command(script: str, args: Sequence[str], nproc: int, nnodes: int = 1,
                     node_rank: int = 0, master_addr: str = "127.0.0.1",
                     master_port: int = 29500, python: str = sys.executable) -> list[str]:
    command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes > 1:
        command += ["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                    "--master_addr", master_addr, "--master_port", str(master_port)]
    else:  # one node: torchrun picks a free port itself
        command += ["--standalone"]
    return command + [script, *args]


def child_env(nproc: int, repo: str) -> dict:
    """The workers' environment: the repository importable, CPU threads split among the
    processes of this node unless OMP_NUM_THREADS says otherwise."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cpus() // max(1, nproc))))
    return env


@dataclass
class Finished:
    code: int  # the command's exit status
    signalled: bool  # the launcher received (and passed on) SIGTERM or SIGINT


def run_logged(command: Sequence[str], log_path: str, env: dict, cwd: str,
               quiet_after: Optional[str] = None, steps_bar: bool = False) -> Finished:
    """Run ``command``, its output streamed to this terminal and appended to ``log_path``;
    a SIGTERM or Ctrl-C to the launcher is passed on (the trainer then saves and stops).
    Once the file ``quiet_after`` exists (a rank's error report, see ``cli.ERROR_FILE``)
    the output goes to the log only: what follows is torchrun's account of the failed
    ranks, and the caller says the error once. ``steps_bar``: when this process's output
    is a terminal, the trainer's ``iter N/M`` lines also drive a progress bar below the
    output (the trainer's own bar needs a terminal, and its output here is a pipe); the
    log gets the lines only."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = _StepsBar() if steps_bar and on_terminal(sys.stdout) else None
        try:
            quiet = False
            for line in iter(proc.stdout.readline, b""):
                quiet = quiet or bool(quiet_after and os.path.exists(quiet_after))
                if not quiet:
                    if bar is not None:
                        bar.show(line)
                    else:
                        sys.stdout.buffer.write(line)
                        sys.stdout.flush()
                log.write(line)
            return Finished(proc.wait(), bool(signalled))
        finally:
            if bar is not None:
                bar.close()
            for number, handler in previous.items():
                signal.signal(number, handler)
            if proc.poll() is None:
                proc.kill()


def run_in_process(command: Sequence[str], log_path: str) -> int:
    """Run a Python script's command line (``[python, script.py, *args]``) in this process,
    as ``python script.py args`` would, its output shown here and appended to ``log_path``
    as :func:`run_logged` does; its exit status (an exception: 2, its traceback logged).

    Why: the launcher's evaluations and exports each paid for a new Python process that
    imports torch and megatron-core (~2.5 s of CPU, most of such a step on a small model);
    run one after another in one process, the imports are paid once. What a step prints,
    C libraries included, goes through file descriptors 1 and 2 (:func:`_teed_output`)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    argv = sys.argv
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        with _teed_output(log):
            sys.argv = list(command[1:])
            try:
                runpy.run_path(command[1], run_name="__main__")
                return 0
            except SystemExit as exit_:
                code = exit_.code
                return code if isinstance(code, int) else (0 if code is None else 1)
            except BaseException:  # noqa: BLE001 - a crash is the step's failure, logged
                traceback.print_exc()
                return 2
            finally:
                sys.argv = argv


@contextlib.contextmanager
def _teed_output(log):
    """File descriptors 1 and 2 into a pipe whose data a thread writes to the former
    standard output and to ``log`` (a binary file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for chunk in iter(lambda: pipe.read(65536), b""):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(saved[0], view):]
                log.write(chunk)

    thread = threading.Thread(target=pump, name="teed-output", daemon=True)
    thread.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    streams = sys.stdout, sys.stderr  # (they may not write to 1 and 2: pytest's do not)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, encoding="utf-8", errors="replace",
                                   closefd=False) for fd in (1, 2))
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.close()  # flushes (the descriptors stay open)
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)  # the pipe's last write ends close: the pump reads its end
        os.dup2(saved[1], 2)
        thread.join(timeout=10)  # (a helper process the step left running may hold one)
        for fd in saved:
            os.close(fd)
        log.flush()


class _StepsBar:
    """A bar of the trainer's steps (``cli.ProgressBar``, shown on this terminal), read from
    its ``iter N/M`` log lines; the lines are printed above it."""

    STEP = re.compile(rb"\biter (\d+)/(\d+) \|")

    def __init__(self):
        self.bar: Optional[ProgressBar] = None

    def show(self, line: bytes) -> None:
        match = self.STEP.search(line)
        if match and self.bar is None:
            self.bar = ProgressBar(total=int(match.group(2)), initial=int(match.group(1)) - 1,
                                   desc="training", unit="step", every=None, stream=sys.stdout)
        if self.bar is not None:
            self.bar.bar.clear()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        if self.bar is not None:
            if match:
                self.bar.update(int(match.group(1)) - self.bar.n)
            self.bar.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stamp() -> str:
    """The time in a log file's name (``train-20250101-120000.log``)."""
    import time

    return time.strftime("%Y%m%d-%H%M%S")
