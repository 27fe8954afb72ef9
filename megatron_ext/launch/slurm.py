"""The Slurm executor: one sbatch script per training job, and the few Slurm commands
the launcher needs (submit, state, cancel, requeue, wait).

Why a generated script, and why this shape:

* One ``srun`` task per node, each a torchrun agent that starts the node's workers.
  torchrun then owns what it is good at (local ranks, the c10d rendezvous, tearing the
  workers down together) and Slurm owns the nodes; the rendezvous is hosted by the first
  node of the allocation, under the job id, so every node's agent finds it without a
  port file or a ``MASTER_ADDR`` computed by hand.
* The script is a deterministic function of a :class:`SlurmJob` (no dates, no
  environment read at generation time), so it can be compared with golden files and
  rewritten identically when the same command is run again.
* Slurm decides when a job stops (time limit, ``scancel``, ``scontrol requeue``,
  preemption); the trainer saves a checkpoint and exits on SIGTERM, and rerunning the
  same script resumes from it (``--save DIR --load DIR``). ``--requeue`` and
  ``--open-mode=append`` let a requeued job continue in the same log files.

Signals, the one subtle part (checked on a real cluster by tests/launch/):

* ``--signal=TERM@S`` (no ``B:``) makes Slurm send SIGTERM S seconds before the time
  limit to every process of the job's steps: the torchrun agents *and* their workers
  (Slurm tracks a step's processes by descent, whatever session torchrun starts its
  workers in). ``B:`` would signal only the batch shell, which would have to forward it.
  The batch shell itself is not signalled, so it waits for ``srun`` as usual.
* A torchrun agent that gets SIGTERM forwards it to its workers and kills them with
  SIGKILL after a grace period: 30 s by default, too short to save a large model. The
  script exports ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (read by torch's launcher when
  ``--shutdown-timeout`` is not given; older versions ignore it) equal to the warning
  time, so the workers get all of it.
* Each worker's trainer finishes its iteration, agrees with the other ranks that a
  signal came, saves and exits; the agent then exits with an error (it was signalled),
  so the job ends FAILED before its time limit instead of TIMEOUT, with a checkpoint.
  A job cancelled or requeued gets SIGTERM too (then SIGKILL after the cluster's
  ``KillWait``, 30 s by default), so it usually saves as well.
* "Every process" includes helpers that the workers started (torchrun's agent
  also signals each worker's whole process group): a save must not need one.
  megatron-core's checkpoint writer would keep such a helper (a multiprocessing
  Manager) after the first save; ours reports its results in the process itself
  (``checkpointing/writer.py``), so a save on SIGTERM after earlier saves works
  (tests/launch/test_slurm_cluster.py).
* Slurm checks time limits periodically (every 30 s), so the warning may come up to
  about 30 s earlier than asked; a warning that lands before the trainer has installed
  its handler (while it imports torch) kills the workers without a checkpoint, so keep
  ``signal_seconds`` well below the time limit.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time as _time
from dataclasses import dataclass, field
from typing import Collection, Mapping, Optional, Sequence

from megatron_ext.errors import ConfigError, UserError
from megatron_ext.io import write_text


class SlurmError(UserError):
    """A Slurm command failed, or answered something the executor cannot use."""


class SlurmNotFound(SlurmError):
    """A Slurm command (sbatch, squeue, scontrol, scancel) is not installed here."""


FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
})
"""Job states after which a job runs no more (unless requeued by hand)."""

# What sbatch accepts in an #SBATCH line without quoting: we refuse the rest rather
# than rely on how each Slurm version splits a quoted directive.
_PLAIN = re.compile(r"^[A-Za-z0-9_.,:@+/=-]+$")  # no %: sbatch expands %j, %x... in paths
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_SIGNAL_SECONDS = 0xFFFF  # sbatch --signal's sig_time limit


def time_limit_seconds(value: str) -> Optional[int]:
    """Seconds in an sbatch ``--time`` value: ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M`` or ``D-H:M:S``; None for ``UNLIMITED``/``INFINITE``."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(value)
    if not match:
        raise ConfigError(f"time {value!r} is not an sbatch time limit: use minutes, "
                          "MM:SS, HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)")
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # H:M:S
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:  # M:S
        return int(first) * 60 + int(second)
    return int(first) * 60  # M


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    """One training job on a Slurm cluster: what :func:`sbatch_script` writes down.

    Checked when built (a :class:`ConfigError` names the field), so a bad value fails
    before anything is submitted instead of as a job that never starts.
    """

    job_name: str
    """``--job-name``; also names the log files (``%x``)."""
    nodes: int
    processes_per_node: int
    """torchrun's ``--nproc_per_node``; with ``gpus`` also ``--gpus-per-node``."""
    gpus: bool
    """Request ``--gpus-per-node=processes_per_node`` (False: a CPU job, gloo)."""
    log_dir: str
    """Where ``--output``/``--error`` go (``%x-%j.out``/``.err``); relative to ``workdir``."""
    workdir: str
    """The directory the job runs in (the repository root): ``--chdir`` and ``cd``."""
    python: str
    """The interpreter that runs torchrun (``python -m torch.distributed.run``); inside
    the container when ``container_image`` is given."""
    account: Optional[str] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    """sbatch's ``--time`` (e.g. ``04:00:00``); None: the partition's default."""
    container_image: Optional[str] = None
    """A pyxis/enroot image for the srun step (the batch shell stays on the host)."""
    container_mounts: tuple[str, ...] = ()
    """pyxis ``--container-mounts`` entries (``SRC:DST[:FLAGS]``); with an image only."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Exported in the script (sorted by name), so srun hands them to every process."""
    signal_seconds: int = 120
    """SIGTERM this many seconds before the time limit, so the trainer can save
    (``--signal=TERM@S``); also torchrun's grace period before it kills its workers.
    0: no early signal (Slurm's SIGTERM at the limit, then SIGKILL after KillWait)."""
    rdzv_port: int = 29500
    """The c10d rendezvous port on the first node."""
    cpus_per_task: Optional[int] = None
    """CPUs for each node's task (torchrun and all its workers). Give it where the
    cluster binds tasks to CPUs (task/affinity, task/cgroup), which would otherwise run
    a node's whole training on one core; passed to srun too, which no longer inherits
    sbatch's value (Slurm >= 22.05)."""

    def __post_init__(self) -> None:
        if not self.job_name or not re.match(r"^[A-Za-z0-9_.+-]+$", self.job_name):
            raise ConfigError(f"job_name {self.job_name!r}: use letters, digits and . _ + - "
                              "only (it names the job and its log files)")
        for name in ("nodes", "processes_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"cpus_per_task must be at least 1 (got {self.cpus_per_task})")
        for name in ("account", "partition", "log_dir", "workdir"):
            value = getattr(self, name)
            if value is not None and not _PLAIN.match(value):
                raise ConfigError(f"{name} {value!r}: spaces, quotes and shell characters "
                                  "cannot be written in an #SBATCH line; choose another")
        for mount in self.container_mounts:
            if not _PLAIN.match(mount) or "," in mount:
                raise ConfigError(f"container mount {mount!r}: write SRC:DST[:FLAGS] without "
                                  "spaces or commas, one mount per entry")
        if self.container_mounts and not self.container_image:
            raise ConfigError("container_mounts without container_image: mounts are only "
                              "passed to a containerized step; give the image too")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"env name {name!r} is not a shell variable name")
        if not 0 <= self.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise ConfigError(f"signal_seconds must be in 0..{MAX_SIGNAL_SECONDS} "
                              f"(got {self.signal_seconds})")
        if not 0 < self.rdzv_port < 65536:
            raise ConfigError(f"rdzv_port {self.rdzv_port} is not a TCP port")
        if self.time is not None:
            limit = time_limit_seconds(self.time)
            if limit is not None and limit <= 0:
                raise ConfigError(f"time {self.time!r}: the time limit must be positive")
            if limit is not None and self.signal_seconds >= limit:
                raise ConfigError(
                    f"signal_seconds {self.signal_seconds} is not below the time limit "
                    f"{self.time} ({limit} s): the job would be told to stop as it starts; "
                    "lower signal_seconds or raise the time limit")


def _q(value: str) -> str:
    return shlex.quote(str(value))


def sbatch_script(job: SlurmJob, script: str, args: Sequence[str]) -> str:
    """The sbatch script that runs ``script args...`` under torchrun on ``job``'s nodes.

    A pure function of its inputs: the same job gives the same text, byte for byte.
    """
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.cpus_per_task is not None:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.gpus:
        directives.append(f"--gpus-per-node={job.processes_per_node}")
    for name in ("account", "partition", "time"):
        if getattr(job, name) is not None:
            directives.append(f"--{name}={getattr(job, name)}")
    log = job.log_dir.rstrip("/") or "/"
    directives += [f"--chdir={job.workdir}", f"--output={log}/%x-%j.out",
                   f"--error={log}/%x-%j.err", "--open-mode=append", "--requeue"]
    if job.signal_seconds:
        directives.append(f"--signal=TERM@{job.signal_seconds}")

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {directive}" for directive in directives]
    lines += [
        "# Generated by megatron_ext.launch.slurm: one srun task per node, each a torchrun",
        "# agent that starts the node's workers; the first node hosts the rendezvous.",
        "set -euo pipefail",
        "",
    ]
    if job.signal_seconds:
        lines += [
            "# Slurm sends SIGTERM to every process of the step (agents and workers) "
            f"{job.signal_seconds} s",
            "# before the time limit; the trainer saves and exits. torchrun forwards SIGTERM",
            "# and would kill its workers after 30 s: give them the whole warning time.",
            f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.signal_seconds}",
        ]
    lines += [f"export {name}={_q(job.env[name])}" for name in sorted(job.env)]
    lines += [
        f"cd {_q(job.workdir)}",
        'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        "",
    ]
    srun = ["srun", '--nodes="$SLURM_NNODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.container_image:
        srun.append(f"--container-image={_q(job.container_image)}")
        if job.container_mounts:
            srun.append(f"--container-mounts={_q(','.join(job.container_mounts))}")
        srun.append(f"--container-workdir={_q(job.workdir)}")
    torchrun = [_q(job.python), "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                f"--nproc_per_node={job.processes_per_node}", "--rdzv_backend=c10d",
                f'--rdzv_endpoint="$head_node:{job.rdzv_port}"', '--rdzv_id="$SLURM_JOB_ID"']
    program = [_q(script), *_flag_pairs([_q(arg) for arg in args])]
    lines += _wrapped(srun, first="", rest="  ")
    lines[-1] += " \\"
    lines += _wrapped(torchrun + program, first="  ", rest="  ")
    return "\n".join(lines) + "\n"


def _wrapped(words: list[str], first: str, rest: str, width: int = 88) -> list[str]:
    """``words`` as continued shell lines of at most about ``width`` characters (the
    first indented by ``first``, the others by ``rest``), deterministically."""
    lines, current, indent = [], "", first
    for word in words:
        if current and len(indent) + len(current) + len(word) + 3 > width:
            lines.append(f"{indent}{current} \\")
            current, indent = word, rest
        else:
            current = f"{current} {word}" if current else word
    lines.append(f"{indent}{current}")
    return lines


def _flag_pairs(words: list[str]) -> list[str]:
    """``--flag value`` kept on one line by :func:`_wrapped` (cosmetic)."""
    out: list[str] = []
    for word in words:
        if out and out[-1].startswith("-") and " " not in out[-1] and not word.startswith("-"):
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    return out


def write_script(job: SlurmJob, path: str, script: str, args: Sequence[str]) -> str:
    """Write :func:`sbatch_script` to ``path`` (atomically) and create ``job.log_dir``:
    Slurm does not create the directory of ``--output``, and a job whose log file
    cannot be opened fails without a word. Returns ``path``."""
    text = sbatch_script(job, script, args)
    os.makedirs(os.path.join(job.workdir, job.log_dir), exist_ok=True)
    write_text(path, text)
    return path


# ---------------------------------------------------------------- Slurm commands
@dataclass(frozen=True)
class SubmitResult:
    """What :func:`submit` learnt: the job id and, with ``wait``, how the job ended
    (``state``: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...; ``exit_code``: the batch
    script's exit status as Slurm reports it, 0 for a job killed by a signal)."""

    job_id: str
    state: Optional[str] = None
    exit_code: Optional[int] = None


@dataclass(frozen=True)
class JobInfo:
    """A job's state and exit code (``ExitCode=STATUS:SIGNAL``'s status)."""

    state: str
    exit_code: Optional[int]


INSTALL_HINT = ("install the Slurm client tools (Debian/Ubuntu: apt-get install slurm-client) "
                "or run this on a login node of your cluster; to train on this machine, use "
                "the local executor instead")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmNotFound(f"{name} is not installed here (not on PATH): {INSTALL_HINT}")
    return path


def _run(*command: str, timeout: Optional[float] = 60) -> subprocess.CompletedProcess:
    """Run a Slurm command, its output captured; a missing binary is a SlurmNotFound."""
    binary = _binary(command[0])
    try:
        return subprocess.run([binary, *command[1:]], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"{' '.join(command)} did not answer within {timeout} s: is the "
                         "Slurm controller (slurmctld) up? Check `sinfo`") from error


def _failure(result: subprocess.CompletedProcess, what: str) -> SlurmError:
    said = (result.stderr or result.stdout).strip() or "(no message)"
    return SlurmError(f"{what} failed (exit {result.returncode}): {said}")


def submit(script_path: str, wait: bool = False) -> SubmitResult:
    """``sbatch --parsable script_path``; with ``wait``, then wait until the job ends.

    A job that Slurm refuses is a :class:`SlurmError` carrying sbatch's message (a bad
    account, partition, time limit...), a missing ``sbatch`` a :class:`SlurmNotFound`.
    With ``wait``, a job that fails is not an error: the result says how it ended.

    Why not ``sbatch --wait``: it polls after 2, 10, 42, 74... s, so a job of 20 s is
    seen ending 20 s late; :func:`wait_for` polls at about a tenth of the time waited
    (0.5 to 30 s), and a requeued job is waited for through its requeue alike.
    """
    result = _run("sbatch", "--parsable", script_path, timeout=120)
    match = re.match(r"^\s*(\d+)", result.stdout or "")  # "ID" or "ID;CLUSTER"
    if result.returncode != 0 or match is None:
        raise _failure(result, f"sbatch {script_path}")
    job_id = match.group(1)
    if not wait:
        return SubmitResult(job_id)
    wait_for(job_id, FINISHED_STATES, timeout=None)
    info = job_info(job_id)
    return SubmitResult(job_id, info.state, info.exit_code)


def job_info(job_id: str) -> JobInfo:
    """The job's state (PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED,
    TIMEOUT, ...) and exit code: from the controller (``scontrol show job``, which
    remembers a finished job for MinJobAge, 300 s by default), else from accounting
    (``sacct``) where the cluster has it. A job known to neither is a
    :class:`SlurmError`."""
    shown = _run("scontrol", "show", "job", "--oneliner", str(job_id))
    if shown.returncode == 0:
        state = re.search(r"\bJobState=(\S+)", shown.stdout)
        code = re.search(r"\bExitCode=(\d+):", shown.stdout)
        if state:
            return JobInfo(state.group(1), int(code.group(1)) if code else None)
    if shutil.which("sacct"):
        accounted = _run("sacct", "--noheader", "--allocations", "--parsable2",
                         "--format=State,ExitCode", "--jobs", str(job_id))
        rows = accounted.stdout.split("\n") if accounted.returncode == 0 else []
        fields = rows[0].split("|") if rows and rows[0].strip() else []
        if len(fields) == 2:  # "CANCELLED by 0|0:15"
            code = fields[1].partition(":")[0]
            return JobInfo(fields[0].split()[0], int(code) if code.isdigit() else None)
    said = (shown.stderr or shown.stdout).strip()
    raise SlurmError(f"Slurm knows no job {job_id} ({said or 'no answer'}): check the id; "
                     "a finished job is forgotten after MinJobAge where there is no accounting")


def job_state(job_id: str) -> str:
    """The job's state (see :func:`job_info`)."""
    return job_info(job_id).state


def cancel(job_id: str) -> None:
    """``scancel``: Slurm sends the job's processes SIGTERM (the trainer saves and exits),
    then SIGKILL after the cluster's KillWait."""
    result = _run("scancel", str(job_id))
    if result.returncode != 0:
        raise _failure(result, f"scancel {job_id}")


def requeue(job_id: str) -> None:
    """``scontrol requeue``: stop the job (SIGTERM, as a cancel does) and queue it again
    under the same id, so that it resumes from its last checkpoint. Slurm holds a
    requeued job for a while (its BeginTime, about two minutes) before it may start."""
    result = _run("scontrol", "requeue", str(job_id))
    if result.returncode != 0:
        raise _failure(result, f"scontrol requeue {job_id}")


def wait_for(job_id: str, states: Collection[str], timeout: Optional[float],
             poll: Optional[float] = None) -> str:
    """Poll until the job is in one of ``states``; returns that state.

    ``poll``: seconds between queries; None: a tenth of the time waited so far, from
    0.5 to 30 s (prompt for short jobs, gentle with the controller for long ones).
    A job that ends in a state not asked for, or that does not get there within
    ``timeout`` seconds (None: no limit), is a :class:`SlurmError` (waiting for
    RUNNING a job that failed would otherwise take the whole timeout).
    """
    wanted = set(states)
    start = _time.monotonic()
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if state in FINISHED_STATES:
            raise SlurmError(f"job {job_id} ended {state} while waiting for "
                             f"{'/'.join(sorted(wanted))}: see its log files")
        waited = _time.monotonic() - start
        if timeout is not None and waited > timeout:
            raise SlurmError(f"job {job_id} is still {state} after {timeout:.0f} s of waiting "
                             f"for {'/'.join(sorted(wanted))}: check `squeue -j {job_id}`")
        _time.sleep(poll if poll is not None else min(30.0, max(0.5, waited / 10)))
