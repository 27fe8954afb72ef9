"""Running the trainer, tools and check scripts from tests: the session's long-lived
``run_many.py`` workers (:class:`Pool`), batches handed to them (:func:`start_runs`,
:func:`run_many`), batches started at the session's first test for later tests
(:func:`starts_early`), metrics.

A test that needs a process of its own (a command line's smoke test, a signal, a
fresh process's memory) starts one; everything else goes to the workers, which pay
for importing torch and megatron-core once per session instead of once per launch.

Why a module, not a conftest: fixtures that several test directories share live in
``tests/conftest.py`` (a fixture imported into two conftests would run twice); the
helpers they and the tests call live here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from megatron_ext.parallel import free_port

REPO = Path(__file__).resolve().parent.parent
CHATML = ("<|im_start|>", "<|im_end|>")


def model_args(data: dict, iters: int = 6) -> list[str]:
    return ["--data_path", data["prefix"], "--split", "90,10,0",
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", data["vocab_file"],
            "--vocab_extra_ids_list", ",".join(CHATML), "--model_name", "llama2",
            "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4",
            "--num_attention_heads_kv", "2", "--seq_length", "96", "--variable_seq_lengths",
            "--micro_batch_size", "2", "--global_batch_size", "8", "--train_iters", str(iters),
            "--lr", "1e-3", "--lr_warmup_iters", "1", "--eval_iters", "1", "--seed", "1234",
            *data.get("tokenizer_flags", ())]


def torchrun(nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(REPO / "finetune.py"), *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_metrics(directory: Path, split: str = "train") -> list[dict]:
    with open(directory / "metrics.jsonl", encoding="utf-8") as handle:
        return [r for r in map(json.loads, handle) if r["split"] == split]


# ------------------------------------------------------------ long-lived workers
RUN_MANY = REPO / "tests" / "training" / "run_many.py"
MAX_SERIAL_WORKERS = 2
"""At most this many one-process workers, side by side while batches wait for one."""
TIMEOUT_S = 500
"""How long a test waits for a job (queueing included): less than pytest's --timeout, so
that a hung worker is killed here and later batches go to a new one."""
URGENT, NORMAL, EARLY = "0", "5", "8"
"""Batch priorities (the first character of a pending batch's file name): a batch a test
waits for, one a test started, one started early for a later test (:func:`starts_early`)."""


def child_env() -> dict:
    """Environment of a child that trains: one thread each (the machine may have 2 cores)."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Worker:
    """One ``run_many.py --serve`` process, or process group of a :class:`Pool`.

    A process group of N is launched as two torchrun "nodes" of N/2 processes each
    (``--nnodes 2 --node_rank R``, one agent per node, on this machine): every
    multi-process job then also runs across nodes (test_parallel.py's two-node test
    relies on it), with several processes a node where N > 2, for the cost of one more
    agent process (an agent imports torch: ~2 s of CPU).
    """

    def __init__(self, pool: "Pool", nproc: int, name: str):
        self.nproc, self.name, self.root = nproc, name, pool.root
        self.claimed = pool.root / "claimed" / name
        serve = [str(RUN_MANY), "--serve", str(pool.root), name, str(os.getpid())]
        if nproc == 1:
            commands = [[sys.executable, *serve]]
        else:
            port = str(free_port())
            # (each agent looks at its worker once a second, not ten times: an idle agent's
            # only cost, and the session's agents idle for minutes)
            nodes = 2 if nproc % 2 == 0 else nproc
            commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                         "--node_rank", str(node), "--nproc_per_node", str(nproc // nodes),
                         "--master_addr", "127.0.0.1", "--master_port", port,
                         "--monitor_interval", "1", *serve] for node in range(nodes)]
        self.logs = [pool.root / f"{name}.{node}.log" for node in range(len(commands))]
        self.processes = []
        for command, log in zip(commands, self.logs):
            with open(log, "wb") as handle:  # a file, not a pipe: nobody reads it meanwhile
                self.processes.append(subprocess.Popen(
                    command, env=child_env(), cwd=REPO, stdout=handle,
                    stderr=subprocess.STDOUT, start_new_session=True))  # see kill()

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def busy(self) -> bool:
        """Has it claimed a batch that it has not finished?"""
        if not self.claimed.is_dir():
            return False
        names = set(os.listdir(self.claimed))
        return any(f"{name}.done" not in names for name in names
                   if name.endswith(".json"))

    def failure(self) -> str:
        codes = [process.poll() for process in self.processes]
        return f"the run_many.py worker {self.name} ended ({codes}):\n" + "\n".join(
            log.read_text(errors="replace")[-6000:] for log in self.logs)

    def stop(self, timeout: int) -> None:
        """Wait for it to end after ``POOL/stop`` exists; kill it if it does not."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                return

    def kill(self) -> None:
        """Kill it, with what its processes started (torchrun's workers, a job's data
        loader or tool processes): each serving process wrote its id to
        ``POOL/WORKER.pid.RANK`` and leads a process group of its own (torchrun starts
        workers in new sessions; a one-process worker starts in one)."""
        mine = os.getpgid(0)
        pids = [int(p.read_text()) for p in self.root.glob(f"{self.name}.pid.*")]
        pids += [process.pid for process in self.processes]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group != mine:
                    os.killpg(group, signal.SIGKILL)
        for process in self.processes:
            process.wait()


class Pool:
    """The session's ``run_many.py`` workers (see its docstring for the protocol).

    Why: starting a worker costs far more than the tiny runs the tests make (about
    10 s of CPU for one process, 20 s for two, against well under a second for a run),
    so every batch of every test module goes to the same few workers: one per world
    size, and up to :data:`MAX_SERIAL_WORKERS` one-process ones while batches wait.
    A worker starts when the first batch of its world size comes.
    """

    def __init__(self, root: Path):
        self.root = root
        self.workers: list[Worker] = []
        self.count = 0

    def pending(self, nproc: int) -> list[str]:
        return [n for n in os.listdir(self.root / "pending" / str(nproc)) if n.endswith(".json")]

    def submit(self, nproc: int, runs: list[dict], directory: Path,
               priority: str = NORMAL) -> "Launch":
        self.count += 1
        name = f"{self.count:05d}.json"
        pending = self.root / "pending" / str(nproc)
        pending.mkdir(parents=True, exist_ok=True)
        staging = pending / f"{priority}{name}.tmp"
        staging.write_text(json.dumps({"directory": str(directory), "runs": runs}),
                           encoding="utf-8")
        os.rename(staging, pending / f"{priority}{name}")
        self.staff(nproc)
        return Launch(self, nproc, runs, directory, name, priority)

    def staff(self, nproc: int) -> None:
        """Start a worker of this world size if a batch waits and none is free."""
        live = [w for w in self.workers if w.nproc == nproc and w.alive()]
        limit = MAX_SERIAL_WORKERS if nproc == 1 else 1
        idle = [w for w in live if not w.busy()]
        if len(live) < limit and len(self.pending(nproc)) > len(idle):
            self.workers.append(Worker(self, nproc, f"w{nproc}-{len(self.workers)}"))

    def close(self) -> None:
        (self.root / "stop").touch()
        for worker in self.workers:
            worker.stop(timeout=60)


_POOL: list[Pool] = []


def open_pool(root: Path) -> Pool:
    """The session's pool (tests/conftest.py opens it and closes it at the end)."""
    _POOL.append(Pool(root))
    return _POOL[-1]


def close_pool() -> None:
    while _POOL:
        _POOL.pop().close()


class Launch:
    """A batch of runs submitted to the session's :class:`Pool` by :func:`start_runs`.

    Its jobs run one after another on one worker; :meth:`result` waits for one of
    them, :meth:`wait` for all, so that a test may start two batches (say a serial
    one and a 2-process one) and let them run side by side.
    """

    def __init__(self, pool: Pool, nproc: int, runs: list[dict], directory: Path, name: str,
                 priority: str):
        self.pool, self.nproc, self.runs, self.directory = pool, nproc, runs, directory
        self.name, self.priority = name, priority  # its file: priority + name
        self.worker: Worker | None = None

    def _check(self) -> None:
        """While waiting: hurry the batch if it still waits, fail if its worker died."""
        if self.priority != URGENT:
            pending = self.pool.root / "pending" / str(self.nproc)
            with contextlib.suppress(FileNotFoundError):  # claimed already
                os.rename(pending / f"{self.priority}{self.name}",
                          pending / f"{URGENT}{self.name}")
            self.priority = URGENT
        if self.worker is None:
            for worker in self.pool.workers:  # claimed as SEQ-PRIORITY+NAME
                if worker.claimed.is_dir() and any(
                        n.partition("-")[2][1:] == self.name for n in os.listdir(worker.claimed)):
                    self.worker = worker
        if self.worker is None:
            stillborn = [w for w in self.pool.workers if w.nproc == self.nproc
                         and not w.alive() and not w.claimed.is_dir()]
            if stillborn:  # it would fail again: say why instead of starting another
                raise AssertionError(stillborn[0].failure())
            self.pool.staff(self.nproc)
        elif not self.worker.alive():
            raise AssertionError(self.worker.failure())

    def result(self, name: str, timeout: int = TIMEOUT_S) -> "RunResult":
        """Job ``name``'s result, once it has ended (an AssertionError if it crashed)."""
        deadline = time.monotonic() + timeout
        while not (self.directory / f"{name}.json").exists():
            self._check()
            if time.monotonic() > deadline:
                if self.worker is not None:
                    self.worker.kill()  # later batches go to a new one
                raise AssertionError(f"job {name} did not end within {timeout} s")
            time.sleep(0.05)
        result = RunResult.read(self.directory, name)
        if result.returncode not in (0, 1):
            raise AssertionError(f"job {name} crashed:\n{result.log[-8000:]}")
        return result

    def wait(self, timeout: int = TIMEOUT_S) -> dict[str, "RunResult"]:
        return {run["name"]: self.result(run["name"], timeout) for run in self.runs}


class RunResult:
    """A job's exit status (0, or 1 for a UserError), its log, files it was asked to stat
    right after it ended (``mtimes``), for a tool or call job its standard output, and
    the torchrun layout it ran in (``launch``: WORLD_SIZE, LOCAL_WORLD_SIZE and
    GROUP_WORLD_SIZE as rank 0 saw them)."""

    def __init__(self, returncode: int, log: str, mtimes: dict, stdout: str = "",
                 launch: dict | None = None):
        self.returncode, self.log, self.mtimes, self.stdout = returncode, log, mtimes, stdout
        self.launch = launch or {}

    @classmethod
    def read(cls, directory: Path, name: str) -> "RunResult":
        status = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        log = (directory / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        out = directory / f"{name}.out"
        stdout = out.read_text(encoding="utf-8") if out.exists() else ""
        return cls(status["returncode"], log, status.get("mtimes", {}), stdout,
                   status.get("launch"))


def logits_job(name: str, load: Path, tokens, directory: Path, tp: int = 1, pp: int = 1,
               vocab_file: str = "", ep: int = 1) -> dict:
    """A run_many.py job that saves ``load``'s logits for ``tokens`` at TP/PP (and EP, for a
    mixture of experts); read them with :func:`job_logits` after the launch. Jobs of any
    number of checkpoints and layouts share one launch (of a world size divisible by each
    TP x PP)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, directory / f"{name}.tokens.pt")
    return {"name": name, "logits": {
        "load": str(load), "tokens": str(directory / f"{name}.tokens.pt"),
        "out": str(directory / f"{name}.logits.pt"), "tp": tp, "pp": pp,
        "vocab_file": vocab_file, **({"ep": ep} if ep > 1 else {})}}


def job_logits(results: dict, job: dict):
    """The logits a :func:`logits_job` saved (its run must have succeeded)."""
    import torch

    result = results[job["name"]]
    assert result.returncode == 0, result.log[-3000:]
    return torch.load(job["logits"]["out"])


def tool_job(name: str, tool: str, *argv: str) -> dict:
    """A run_many.py job that runs ``tools/<tool>``'s ``main(argv)`` (with --no_progress)
    in the launch's processes; its standard output is the result's ``stdout``."""
    return {"name": name, "tool": tool, "argv": [*argv, "--no_progress"]}


def call_job(name: str, target: str, *args) -> dict:
    """A run_many.py job that calls ``target`` (``tests.module:function``) with ``args``
    in the worker's processes (a check script's ``main``); its standard output is the
    result's ``stdout``."""
    return {"name": name, "call": target, "args": list(args)}


def start_runs(nproc: int, runs: list[dict], directory: Path, early: bool = False) -> Launch:
    """Hand ``runs`` to the session's workers of world size ``nproc``; wait with
    :meth:`Launch.wait` (their files go to ``directory``). ``early``: for a later test
    (see :func:`starts_early`), after the batches of the tests that run now."""
    directory.mkdir(parents=True, exist_ok=True)
    return _POOL[-1].submit(nproc, runs, directory, EARLY if early else NORMAL)


def run_many(nproc: int, runs: list[dict], directory: Path) -> dict[str, RunResult]:
    return start_runs(nproc, runs, directory).wait()


# ------------------------------------------------------------ starting early
_STARTERS: dict[str, Callable] = {}
_STARTED: dict[str, object] = {}


def starts_early(fixture: str) -> Callable:
    """Register ``starter(request)`` as what starts the batches that the fixture named
    ``fixture`` waits for (``request``: a pytest request that sees the session fixtures,
    such as ``train_data`` and ``tmp_path_factory``).

    Why: a test module's fixture starts its batches when its first test runs, and waits;
    the workers would sit idle during the in-process tests before it and the module
    would wait for them after. So the session calls every registered starter whose
    fixture a selected test uses at its first test (:func:`start_early`, from
    tests/conftest.py), with their batches queued after those of the tests that run
    meanwhile, and the fixture takes what its starter returned with :func:`started`.
    """
    def register(starter: Callable) -> Callable:
        assert fixture not in _STARTERS, f"two early starters for {fixture}"
        _STARTERS[fixture] = starter
        return starter
    return register


def start_early(request) -> None:
    """Call the starters of the fixtures that the selected tests use, in test order (the
    modules registered them when they were collected). A starter in a test module counts
    for that module's tests only (another module may have a fixture of the same name);
    one in a conftest for any test."""
    used = {(item.module.__name__, fixture) for item in request.session.items
            if hasattr(item, "module") for fixture in getattr(item, "fixturenames", ())}
    for fixture, starter in _STARTERS.items():
        if any(name == fixture and (starter.__module__ == module
                                    or starter.__module__.endswith("conftest"))
               for module, name in used):
            _STARTED[fixture] = starter(request)


def started(fixture: str, request):
    """What ``fixture``'s starter returned: early, or now if it was not called early."""
    if fixture in _STARTED:
        return _STARTED.pop(fixture)
    return _STARTERS[fixture](request)


ITERS = 6


# ------------------------------------------------------------ memory of a conversion
IMPORT_MEMORY_PROBE = r"""
import sys, threading, time
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
model_path, out, counted, *warm_up = sys.argv[1:]
for path in warm_up:
    import_hf(ImportConfig(path, out + "-warm-up", progress=False))
def used():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return sum(int(fields[key].split()[0]) * 1024 for key in counted.split(","))
base = peak = used()
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, used())
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
import_hf(ImportConfig(model_path, out, max_shard_bytes=8 * 2**20, progress=False))
done = True
thread.join()
print(base, peak)
"""


def import_memory_growth(model_path: Path, out: Path, counted: str = "VmRSS",
                         warm_up: tuple[Path, ...] = ()) -> int:
    """Bytes by which ``import_hf(model_path)`` raises the peak of ``counted`` (fields of
    /proc/self/status, e.g. ``VmRSS`` or ``RssAnon``), in a fresh process, sampled by a
    thread (ru_maxrss would report the forking parent's peak: Linux keeps it across exec).
    ``warm_up``: models imported first, so that what any import costs once (libraries,
    a tokenizer conversion's machinery) is not counted."""
    result = subprocess.run([sys.executable, "-c", IMPORT_MEMORY_PROBE, str(model_path),
                             str(out), counted, *map(str, warm_up)], env=child_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    base, peak = map(int, result.stdout.split()[-2:])
    return peak - base
