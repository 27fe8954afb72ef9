"""The Slurm job script on a real single-node cluster (tests/launch/slurm_cluster.py): the
project's trainer as a 1-node CPU job written by ``write_script``, stopped by
its time limit approaching (``--signal``): the trainer saves on SIGTERM after its periodic
checkpoints. The launcher's own Slurm runs (``sft.py --executor slurm``: wait, scancel and
resubmit, requeue) are in test_sft_slurm.py."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_ext.launch.slurm import (
    FINISHED_STATES,
    SlurmJob,
    job_state,
    submit,
    wait_for,
    write_script,
)
from megatron_ext.parallel import free_port
from tests.conftest import REPO
from tests.runs import model_args, started, starts_early, train_metrics

pytestmark = pytest.mark.slow
ITERS = 40
JOB_TIMEOUT = 300  # seconds a job may take, queueing included


def cpu_job(name: str, root: Path, **changes) -> SlurmJob:
    fields = dict(
        job_name=name, nodes=1, processes_per_node=2, gpus=False,
        # two CPUs for two processes: jobs then run one after another on this node
        cpus_per_task=min(2, os.cpu_count() or 1),
        log_dir=str(root / "logs"), workdir=str(REPO), python=sys.executable,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        signal_seconds=30, rdzv_port=free_port())
    fields.update(changes)
    return SlurmJob(**fields)


class Training:
    """finetune.py as a Slurm job that saves to and resumes from ``run`` (the same
    script submitted again continues where the last checkpoint is)."""

    def __init__(self, root: Path, name: str, train_data: dict, iters: int = ITERS,
                 save_interval: int = 2, **job):
        self.root, self.name, self.run = root, name, root / name
        args = model_args(train_data, iters) + [
            "--save", str(self.run), "--load", str(self.run),
            "--save_interval", str(save_interval)]
        self.job = cpu_job(name, root, **job)
        self.script = write_script(self.job, str(root / f"{name}.sbatch"), "finetune.py", args)

    def log(self, job_id: str) -> str:
        """The job's stdout and stderr (all its runs: a requeued job appends)."""
        return "".join((self.root / "logs" / f"{self.name}-{job_id}.{ext}").read_text(
            errors="replace") if (self.root / "logs" / f"{self.name}-{job_id}.{ext}").exists()
            else "" for ext in ("out", "err"))

    def logged(self) -> int:
        """Training iterations in metrics.jsonl so far."""
        try:
            return len(train_metrics(self.run))
        except (FileNotFoundError, ValueError):  # not yet, or a line being written
            return 0

    def wait_for_iterations(self, job_id: str, count: int, timeout: float = JOB_TIMEOUT):
        """Wait until ``count`` iterations are logged (the job still running)."""
        deadline = time.monotonic() + timeout
        while self.logged() < count:
            state = job_state(job_id)
            if state in FINISHED_STATES or time.monotonic() > deadline:
                pytest.fail(f"job {job_id} is {state} before logging {count} iterations:\n"
                            f"{self.log(job_id)[-4000:]}")
            time.sleep(0.05)

    def checkpoint(self) -> int:
        return int((self.run / "latest_checkpointed_iteration.txt").read_text())


def job_field(cluster, job_id: str, name: str) -> str:
    shown = cluster.command("scontrol", "show", "job", "--oneliner", job_id).stdout
    return re.search(rf"\b{name}=(\S+)", shown).group(1)


@starts_early("time_limited")
def start_time_limited(request) -> tuple | None:
    """Submit the time-limited job (:func:`time_limited`) and follow it in a thread: it
    starts with the session (tests/runs.py:starts_early), and its minute of waiting for
    Slurm, which costs no CPU, passes while the tests before this module run. None where
    the session's first test does not see the Slurm cluster (a selection that starts
    outside tests/launch): the fixture then starts it itself."""
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except pytest.FixtureLookupError:
        return None
    root = request.getfixturevalue("tmp_path_factory").mktemp("slurm_jobs")
    # one process: Slurm's launcher runs 2-process steps in test_sft_slurm.py
    training = Training(root, "timelimit", request.getfixturevalue("train_data"),
                        iters=100000, save_interval=2, time="00:10:00", signal_seconds=100,
                        processes_per_node=1, cpus_per_task=1)
    job_id = submit(training.script).job_id
    outcome: dict = {}

    def follow() -> None:
        try:
            outcome["state"] = _signalled_and_finished(cluster, training, job_id)
        except BaseException as error:  # pytest.fail's too: raised again by the fixture
            outcome["error"] = error

    thread = threading.Thread(target=follow, name="time-limited job", daemon=True)
    thread.start()
    return training, job_id, thread, outcome


@pytest.fixture(scope="module")
def time_limited(request):
    """A job told to stop by ``--signal=TERM@100`` as its time limit approaches: its
    training, final state and log; periodic checkpoints before the signal, and the save
    that the SIGTERM asks for after them (:func:`_signalled_and_finished`)."""
    started_job = started("time_limited", request) or start_time_limited(request)
    training, job_id, thread, outcome = started_job
    thread.join(timeout=JOB_TIMEOUT + 600)
    assert not thread.is_alive(), "the time-limited job's thread never ended"
    if "error" in outcome:
        raise outcome["error"]
    return training, outcome["state"], training.log(job_id)


def _signalled_and_finished(cluster, training: Training, job_id: str) -> str:
    """Wait for the job to save twice, lower its limit and wait for Slurm's SIGTERM, then
    for its end; its final state.

    The limit is lowered once training runs (``scontrol update TimeLimit``), to the next
    whole minute at least 60 s away: Slurm checks limits every 30 s and may signal up to
    30 s early, so a short limit given at submission could signal the workers while they
    still import torch, before the trainer handles SIGTERM; and this way the test waits
    well under a minute for the signal, with 30 s or more between it and the limit.

    Meanwhile the worker is paused (SIGSTOP) once it has saved twice, and continued
    (SIGCONT) as soon as Slurm's SIGTERM is pending for it: the signal, its handling and
    the save are the job's own, but the wait for Slurm's periodic check (up to 30 s)
    costs no CPU; training flat out it cost half a minute of a core. (torchrun's agent,
    signalled too, gives its worker 30 s to exit before it kills it.)"""
    training.wait_for_iterations(job_id, 5)  # saved at iterations 2 and 4
    worker = _worker_of(training.run)
    os.kill(worker, signal.SIGSTOP)
    try:
        elapsed = _seconds(job_field(cluster, job_id, "RunTime"))
        minutes = math.ceil((elapsed + 60) / 60)
        cluster.command("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
        deadline, looked = time.monotonic() + minutes * 60 + 60, 0.0
        while not _sigterm_pending(worker):  # /proc each 50 ms; scontrol each second
            now = time.monotonic()
            assert now < deadline, "Slurm never signalled the job"
            if now - looked > 1:
                if job_state(job_id) in FINISHED_STATES:
                    break
                looked = now
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    return wait_for(job_id, FINISHED_STATES, timeout=minutes * 60 + 120)


def _worker_of(run: Path) -> int:
    """The process id of the trainer (not its torchrun agent, nor srun) saving to ``run``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [part.decode(errors="replace") for part in argv]
        if (str(run) in words and any(word.endswith("finetune.py") for word in words)
                and "torch.distributed.run" not in words and "srun" not in words[0]):
            return int(pid)
    raise AssertionError(f"no trainer process saves to {run}")


def _sigterm_pending(pid: int) -> bool:
    """Is a SIGTERM pending for the (stopped) process ``pid``? (/proc's pending masks)"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    bit = 1 << (signal.SIGTERM - 1)
    return any(int(line.split()[1], 16) & bit for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:")))


def test_time_limit_signal_saves_before_the_limit(time_limited):
    """Every process of the step gets SIGTERM: the trainer stops and saves, and the job
    ends before its limit (FAILED: torchrun exits with an error when signalled), instead
    of being killed at it (TIMEOUT)."""
    training, state, log = time_limited
    assert state == "FAILED", log[-4000:]
    match = re.search(r"stopping after iteration (\d+) \(signal 15\)", log)
    assert match, log[-4000:]
    stopped_at = int(match.group(1))
    assert f"saved checkpoint {training.run / f'iter_{stopped_at:07d}'}" in log, log[-4000:]
    assert training.checkpoint() == stopped_at
    assert "death signal, shutting down workers" in log  # the agent got it as well


def _seconds(hms: str) -> int:
    days, _, rest = hms.rpartition("-")
    h, m, s = (int(x) for x in rest.split(":"))
    return (int(days or 0) * 24 + h) * 3600 + m * 60 + s
