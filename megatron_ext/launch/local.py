"""The local executor: ``torchrun`` on this node, its output shown and kept in a log.

Why a subprocess, not in-process training: the launcher outlives the run (to
evaluate and export after it) and must stay light; torchrun gives the workers
their ranks, single node or several (``--nnodes``/``--node_rank``/
``--master_addr``, the same command on every node).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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
