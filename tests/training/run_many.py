"""Test driver: several trainer runs, logits checks and tool runs, one after another, in
one launch.

  python run_many.py SPEC.json                              (world size 1)
  torchrun --nproc_per_node N run_many.py SPEC.json          (every run at world size N)

Why: each launch pays for starting Python, importing torch and megatron-core
and forming the process group (most of a tiny run's time on a CPU). The
process group is made once; between runs only megatron-core's model-parallel
state is destroyed, so the next run may use another TP/PP/DP layout.

SPEC.json is a list of jobs, each one of

- ``{"name": ..., "argv": [finetune.py flags]}``: a trainer run;
- ``{"name": ..., "logits": {"load", "tokens", "out", "tp", "pp", "vocab_file"}}``:
  load a checkpoint at that TP/PP and save its logits for the token ids in the
  ``tokens`` file (``torch.save``) to ``out`` (see ``tests/runs.py:logits_job``);
- ``{"name": ..., "tool": "generate.py", "argv": [...]}``: a tool's ``main(argv)``,
  its standard output in ``<name>.out``.

For each job, rank 0 writes ``<name>.log`` (what finetune.py would log on stderr,
plus ``error: <message>`` for a :class:`UserError`) and ``<name>.json``
(``{"returncode": 0 or 1, "mtimes": {path: st_mtime_ns}}`` for the paths in the
run's optional ``"stat"`` list, read right after it ended) beside SPEC.json. A run that fails with a
UserError does not stop the later ones (error runs belong in a world-size-1
launch: on more ranks the others would wait for the failed one).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext.cli import setup_logging  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from megatron_ext.parallel import shutdown  # noqa: E402
from megatron_ext.training.arguments import parse_config  # noqa: E402
from megatron_ext.training.trainer import Trainer  # noqa: E402


def run_one(body: Callable[[], None], log: Path) -> int:
    """Run ``body`` with its log in ``log``; 0, or 1 for a UserError."""
    from megatron.core import parallel_state

    rank0 = int(os.environ.get("RANK", "0")) == 0
    handler = logging.FileHandler(log, mode="w", encoding="utf-8") if rank0 else None
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
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        # the next run may have another layout; the process group itself stays
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def save_logits(job: dict) -> None:
    """Load a checkpoint at the job's TP/PP and save its full logits (one copy, rank 0)."""
    import torch

    from megatron_ext.inference.loading import full_logits, load_for_inference

    loaded = load_for_inference(job["load"], int(job["tp"]), int(job["pp"]),
                                vocab_file=job.get("vocab_file") or None)
    logits = full_logits(loaded, torch.load(job["tokens"]))
    if logits is not None and loaded.layout.tp_rank == 0 and loaded.layout.dp_rank == 0:
        torch.save(logits.cpu(), job["out"])


def run_tool(tool: str, argv: list[str], out: Path) -> None:
    """A tool's ``main(argv)`` (tools/ is a directory of scripts), stdout into ``out``."""
    import contextlib
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / tool
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with open(out if rank0 else os.devnull, "w", encoding="utf-8") as handle:
        with contextlib.redirect_stdout(handle):
            module.main(argv)


def run_job(job: dict, directory: Path) -> int:
    """One job (see the module docstring) with its log in ``<name>.log``; 0 or 1."""
    if "logits" in job:
        return run_one(lambda: save_logits(job["logits"]), directory / f"{job['name']}.log")
    if "tool" in job:
        return run_one(lambda: run_tool(job["tool"], job["argv"],
                                        directory / f"{job['name']}.out"),
                       directory / f"{job['name']}.log")
    # as finetune.py does
    return run_one(lambda: Trainer(parse_config(job["argv"])).train(),
                   directory / f"{job['name']}.log")


def main() -> None:
    spec = Path(sys.argv[1])
    setup_logging()
    try:
        for run in json.loads(spec.read_text(encoding="utf-8")):
            code = run_job(run, spec.parent)
            if int(os.environ.get("RANK", "0")) == 0:
                mtimes = {path: os.stat(path).st_mtime_ns for path in run.get("stat", ())
                          if os.path.exists(path)}
                (spec.parent / f"{run['name']}.json").write_text(
                    json.dumps({"returncode": code, "mtimes": mtimes}))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
