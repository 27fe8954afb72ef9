"""Test driver: trainer runs, logits checks, tool runs and test helpers, one after
another, in one long-lived process (or process group).

  python run_many.py --serve POOL WORKER PARENT_PID                      (world size 1)
  torchrun --nproc_per_node N run_many.py --serve POOL WORKER PARENT_PID  (world size N)

Why: each launch pays for starting Python, importing torch and megatron-core,
forming the process group and megatron-core's first checkpoint save (which
spawns a helper process): ~10 s of CPU for one process, ~20 s for two, against
well under a second for a tiny run itself. So a test session starts a few of
these workers once (``tests/runs.py:Pool``) and hands them batches of jobs.
The default process group is made once; before a job of another TP/PP/CP
layout than the last one, and after each batch, megatron-core's model-parallel
state and groups are destroyed, so that jobs of any layouts may follow each
other and an idle worker costs (almost) nothing.

A batch is a JSON file ``{"directory": ..., "runs": [job, ...]}`` that the pool
writes into ``POOL/pending/N/`` (N: the world size it needs; names sort by
priority, then submission). Rank 0 of an idle worker claims the first one by
renaming it into ``POOL/claimed/WORKER/`` (``SEQ-NAME``: the worker's own
sequence), the other ranks follow that sequence, all run its jobs in order,
then rank 0 writes ``SEQ-NAME.done`` beside it. A worker exits once
``POOL/stop`` exists (rank 0 leaves ``SEQ-stop`` for the others), or when the
pytest process (PARENT_PID) is gone.

Each job is one of

- ``{"name": ..., "argv": [finetune.py flags]}``: a trainer run;
- ``{"name": ..., "logits": {"load", "tokens", "out", "tp", "pp", "vocab_file"}}``:
  load a checkpoint at that TP/PP and save its logits for the token ids in the
  ``tokens`` file (``torch.save``) to ``out`` (see ``tests/runs.py:logits_job``);
- ``{"name": ..., "tool": "generate.py", "argv": [...]}``: a tool's ``main(argv)``,
  its standard output in ``<name>.out``;
- ``{"name": ..., "call": "tests.module:function", "args": [...]}``: a test helper
  (a check script's ``main``), its standard output in ``<name>.out``.

For each job, rank 0 writes ``<name>.log`` (what finetune.py would log on stderr,
plus ``error: <message>`` for a :class:`UserError`, or the traceback of any other
exception) and then ``<name>.json`` (``{"returncode": 0, 1 for a UserError or 2 for
any other exception, "mtimes": {path: st_mtime_ns}, "launch": {...}}``: the paths in the
job's optional ``"stat"`` list, read right after it ended, and torchrun's WORLD_SIZE,
LOCAL_WORLD_SIZE and GROUP_WORLD_SIZE) in the batch's directory. A
job that fails does not stop the later ones (error runs belong in a world-size-1
batch: on more ranks the others would wait for the failed one).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext import startup  # noqa: E402

startup.pause()  # settled once the jobs' modules are imported (see serve), as entry points do

import torch.distributed  # noqa: E402

from megatron_ext.cli import setup_logging  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from megatron_ext.io import write_json  # noqa: E402
from megatron_ext.parallel import shutdown  # noqa: E402
from megatron_ext.training.arguments import parse_config  # noqa: E402
from megatron_ext.training.backends import TRAINER_MODULES, make_trainer  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
POLL_S = 0.05
IDLE_POLL_S = 0.25
"""Waiting for a batch, a worker looks every POLL_S at first, then less and less often, up
to every IDLE_POLL_S: a session's idle workers, polling 20 times a second, cost as much
CPU as a test of their own."""


def run_one(body: Callable[[], None], log: Path) -> int:
    """Run ``body`` with its log in ``log``; 0, 1 for a UserError, 2 for another exception.

    Afterwards the process is put back as a fresh one would be where a job can tell:
    the environment variables restored (megatron-core sets NVTE_* ones for the
    attention backend of the models it builds). megatron-core's model-parallel state
    is left to :func:`prepare_layout`, the job's garbage to the collection after its
    batch (:func:`release`).
    """
    environment = dict(os.environ)
    handler = logging.FileHandler(log, mode="w", encoding="utf-8") if RANK == 0 else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        body()
        return 0
    except UserError as err:
        if handler is not None:
            handler.stream.write(f"error: {err}\n")
        return 1
    except (Exception, SystemExit) as err:  # reported to the test, the worker goes on
        if handler is not None:
            handler.stream.write("".join(traceback.format_exception(err)))
        return 2
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        os.environ.clear()
        os.environ.update(environment)


def save_logits(job: dict) -> None:
    """Load a checkpoint at the job's TP/PP and save its full logits (one copy: the first
    rank of the last pipeline stage, which has them; at PP > 1 not rank 0, see
    :func:`run_batch`)."""
    import torch

    from megatron_ext.inference.loading import full_logits, load_for_inference
    from megatron_ext.io import atomic_write

    loaded = load_for_inference(job["load"], int(job["tp"]), int(job["pp"]),
                                vocab_file=job.get("vocab_file") or None,
                                ep=int(job.get("ep", 1)))
    logits = full_logits(loaded, torch.load(job["tokens"]))
    if logits is not None and loaded.layout.tp_rank == 0 and loaded.layout.dp_rank == 0:
        with atomic_write(job["out"], "wb") as handle:
            torch.save(logits.cpu(), handle)


def tool_main(tool: str) -> Callable:
    """A tool's ``main`` (tools/ is a directory of scripts)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / tool
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def helper(target: str) -> Callable:
    """``tests.module:function`` -> that function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def with_stdout(out: Path, body: Callable[[], None]) -> None:
    """``body()`` with its standard output in ``out`` (rank 0; the others' is dropped)."""
    with open(out if RANK == 0 else os.devnull, "w", encoding="utf-8") as handle:
        with contextlib.redirect_stdout(handle):
            body()


def run_job(job: dict, directory: Path) -> int:
    """One job (see the module docstring) with its log in ``<name>.log``; 0, 1 or 2."""
    log, out = directory / f"{job['name']}.log", directory / f"{job['name']}.out"
    if "logits" in job:
        return run_one(lambda: save_logits(job["logits"]), log)
    if "tool" in job:
        return run_one(lambda: with_stdout(out, lambda: tool_main(job["tool"])(job["argv"])),
                       log)
    if "call" in job:
        return run_one(lambda: with_stdout(out, lambda: helper(job["call"])(*job["args"])),
                       log)
    # as finetune.py does
    return run_one(lambda: make_trainer(parse_config(job["argv"])).train(), log)


def job_layout(job: dict) -> tuple[int, int, int, int] | None:
    """The TP, PP, CP and EP sizes a job makes megatron-core's groups for, where it says so
    (a trainer run or a logits check; a tool or a helper may do anything)."""
    if WORLD == 1:
        return 1, 1, 1, 1
    if "logits" in job:  # inference: CP 1
        return (int(job["logits"]["tp"]), int(job["logits"]["pp"]), 1,
                int(job["logits"].get("ep", 1)))
    if "tool" in job or "call" in job:
        return None
    try:
        parallel = parse_config(job["argv"]).parallel
    except (UserError, SystemExit):  # the job itself will report it
        return None
    return (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
            parallel.context_parallel_size, parallel.expert_model_parallel_size)


def prepare_layout(job: dict) -> None:
    """Keep megatron-core's model-parallel state if the job has the layout it was made
    for, else destroy it with its process groups (:func:`release_groups`)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    current = (parallel_state.get_tensor_model_parallel_world_size(),
               parallel_state.get_pipeline_model_parallel_world_size(),
               parallel_state.get_context_parallel_world_size(),
               parallel_state.get_expert_model_parallel_world_size())
    if job_layout(job) != current:
        release_groups()


def release_groups() -> None:
    """Destroy megatron-core's model-parallel state and every process group but the
    default one (the next job makes what it needs: ~20 ms).

    Why: megatron-core's ``destroy_model_parallel`` only forgets its groups, and each
    gloo group keeps its worker threads, its connections and, without the compat
    layer's shared device (patch 10), an event-loop thread that wakes every 10 ms:
    without both, megatron-core's ~25 groups cost a process ~3% of a core, busy or
    idle. torch.distributed has no public list of the groups, hence its private one
    here."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    names = distributed_c10d._world.pg_names
    for group in sorted((g for g in names if g is not dist.group.WORLD), key=names.get):
        dist.destroy_process_group(group)  # the same order on every rank


def release() -> None:
    """After a batch: its process groups destroyed (idle until the next batch: no gloo
    threads left to wake), then its jobs' models and optimizers collected (memory, open
    files).

    Collected once a batch, not after each job: a full collection traverses every object
    that is not frozen (see :func:`serve`), and what later jobs import (other families,
    the tools, Weights & Biases, torch.compile's inductor: up to ~190k objects in a
    worker) makes each one cost ~0.1 s in every rank. A job's garbage in the meantime
    is a few MB, and its process groups are shut down by ``destroy_process_group``
    whoever still refers to them."""
    release_groups()
    gc.collect()


def run_batch(batch: dict) -> None:
    directory = Path(batch["directory"])
    for job in batch["runs"]:
        prepare_layout(job)
        code = run_job(job, directory)
        if WORLD > 1:
            # Rank 0 says the job ended (its .json) once every rank has: another rank may
            # write its output (at PP > 1 the last stage has the logits); a test that read
            # such a file as soon as rank 0 was done found it half-written.
            torch.distributed.barrier()
        if RANK == 0:
            mtimes = {path: os.stat(path).st_mtime_ns for path in job.get("stat", ())
                      if os.path.exists(path)}
            launch = {key: os.environ.get(key)
                      for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE")}
            write_json(str(directory / f"{job['name']}.json"),
                       {"returncode": code, "mtimes": mtimes, "launch": launch})


def thread_count() -> str:
    """This process's threads, gloo's included (Linux), for the worker's log."""
    try:
        return str(len(os.listdir("/proc/self/task")))
    except OSError:
        return "?"


def parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def claim(pool: Path, world: int, claimed: Path, seq: int) -> Path | None:
    """Rank 0: move the first pending batch of this world size into ``claimed``."""
    pending = pool / "pending" / str(world)
    for name in sorted(os.listdir(pending)):
        if not name.endswith(".json"):
            continue  # a batch being written
        target = claimed / f"{seq:05d}-{name}"
        try:
            os.rename(pending / name, target)
        except FileNotFoundError:
            continue  # another worker took it
        return target
    return None


def follow(claimed: Path, seq: int) -> Path | None:
    """The other ranks: the batch rank 0 claimed as number ``seq``, once it has."""
    for name in os.listdir(claimed):
        if name.startswith(f"{seq:05d}-") and not name.endswith(".done"):
            return claimed / name
    return None


def serve(pool: Path, worker: str, parent: int) -> None:
    claimed = pool / "claimed" / worker
    claimed.mkdir(parents=True, exist_ok=True)
    (pool / f"{worker}.pid.{RANK}").write_text(str(os.getpid()))  # for Worker.kill
    # What the jobs import, imported now (without full collections) and frozen with the
    # rest (megatron_ext/startup.py): the collection after each batch then looks at its
    # jobs' objects only, not at every module's (~160k more: 0.1-0.15 s a collection in
    # each rank). Frozen once, here: freezing after batches would keep cycles that die
    # later (a batch's jobs leave objects behind in megatron-core's and our caches; frozen
    # after each batch, the suite's workers took twice the CPU).
    for modules in TRAINER_MODULES.values():
        for module in modules:
            importlib.import_module(module)
    for module in ("transformers.models.llama.modeling_llama", "peft"):
        importlib.import_module(module)
    startup.settle()
    seq, wait = 0, POLL_S
    while parent_alive(parent):
        if RANK == 0 and (pool / "stop").exists():  # batches left: nobody waits for them
            (claimed / f"{seq:05d}-stop").touch()
            return
        batch = claim(pool, WORLD, claimed, seq) if RANK == 0 else follow(claimed, seq)
        if batch is None:
            time.sleep(wait)
            wait = min(IDLE_POLL_S, wait * 1.25)
            continue
        wait = POLL_S
        if batch.name.endswith("-stop"):
            return
        start = time.perf_counter()
        run_batch(json.loads(batch.read_text(encoding="utf-8")))
        release()
        if RANK == 0:
            (claimed / f"{batch.name}.done").touch()
            logging.info("batch %s: %.1f s, %s threads now", batch.name,
                         time.perf_counter() - start, thread_count())
        seq += 1


def main() -> None:
    setup_logging()
    if sys.argv[1] != "--serve":  # one batch file, as a pool worker would run it
        startup.settle()
        try:
            run_batch(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
        finally:
            shutdown()
        return
    serve(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    # Done: leave without destroying the default process group (the others went after
    # each batch); but stop the processes multiprocessing started (a job's data loader or
    # tool may have) as Python's own exit would.
    from multiprocessing import util

    util._exit_function()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
