"""A real single-node Slurm cluster for the tests: slurmctld and slurmd on this machine,
with a configuration of their own in a temporary folder (``SLURM_CONF`` points at it,
so the machine's /etc/slurm is left alone), as ../shared/SLURM.md describes.

Why real daemons: what matters in the Slurm executor is how Slurm and torchrun treat a
job (srun steps, signals, cancel, requeue, time limits), which no mock can answer.

The :func:`slurm_cluster` fixture (registered in tests/launch/conftest.py) starts the
daemons once per session, waits until ``sinfo`` shows the partition idle, and stops
them by their pid files at the end. Missing Slurm binaries fail the tests that use it,
with what to install (scripts/test.sh installs them when run as root): never a silent
skip, which CI would report as a pass.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_ext.parallel import free_port

PARTITION = "debug"
NODE = "localhost"
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # the daemons, off a non-root PATH


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def memory_mb() -> int:
    """RealMemory for the node: below what the machine has (slurmd drains a node that
    has less than its configuration says)."""
    with open("/proc/meminfo") as handle:
        total_kb = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
    return max(256, total_kb // 1024 * 3 // 4)


SLURM_CONF = """\
ClusterName=local
SlurmctldHost={node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser={user}
SlurmdUser={user}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={node} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """The daemons of one cluster: :meth:`start`, :meth:`stop`, and the environment in
    which the Slurm commands reach them (``SLURM_CONF``)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus = os.cpu_count() or 1
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(
            node=NODE, partition=PARTITION, user=getpass.getuser(), root=self.root,
            cpus=self.cpus, memory=memory_mb(), ctld_port=free_port(),
            slurmd_port=free_port()))

    def command(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): "
                                 f"{result.stderr}{result.stdout}\n{self.logs()}")
        return result

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        self.command("slurmctld", "-i")  # both daemonize; -i: ignore any saved state
        self.command("slurmd", "-N", NODE)
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until ``sinfo`` shows the partition's node idle (up, and nothing left of
        a job on it)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.command("sinfo", "--noheader", "--partition", PARTITION,
                                 "--format", "%t", check=False)
            if shown.returncode == 0 and shown.stdout.split() == ["idle"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the Slurm partition {PARTITION} is not idle after {timeout} s (sinfo: "
                    f"{shown.stdout}{shown.stderr})\n{self.logs()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        """Stop both daemons by the pids in their pid files (SIGTERM, then SIGKILL)."""
        pids = []
        for name in DAEMONS:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pids.append(int((self.root / f"{name}.pid").read_text().split()[0]))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in DAEMONS:
            path = self.root / "log" / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name}.log\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):  # reap it if it is ours (it is not:
        os.waitpid(pid, os.WNOHANG)               # the daemons detach), else a zombie
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster (partition ``debug``, node ``localhost`` with this
    machine's CPUs); ``SLURM_CONF`` is set in this process for the session, so the
    executor's commands (sbatch, scontrol, ...) and the jobs' srun reach it."""
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): install it with "
                    "`apt-get install -y slurmctld slurmd slurm-client` (scripts/test.sh does "
                    "this when run as root) to run the real-cluster tests", pytrace=False)
    # a short path: slurmd puts the steps' unix sockets in its spool directory
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    cluster = SlurmCluster(root)
    saved = {name: os.environ.get(name) for name in ("SLURM_CONF", "PATH")}
    os.environ.update(SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)
