"""Test driver: several trainer runs, one after another, in one launch.

  python run_many.py SPEC.json                              (world size 1)
  torchrun --nproc_per_node N run_many.py SPEC.json          (every run at world size N)

Why: each launch pays for starting Python, importing torch and megatron-core
and forming the process group (most of a tiny run's time on a CPU). The
process group is made once; between runs only megatron-core's model-parallel
state is destroyed, so the next run may use another TP/PP/DP layout.

SPEC.json is a list of ``{"name": ..., "argv": [finetune.py flags]}``. For
each run, rank 0 writes ``<name>.log`` (what finetune.py would log on stderr,
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext.cli import setup_logging  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from megatron_ext.parallel import shutdown  # noqa: E402
from megatron_ext.training.arguments import parse_config  # noqa: E402
from megatron_ext.training.trainer import Trainer  # noqa: E402


def run_one(argv: list[str], log: Path) -> int:
    """One finetune.py run (as its ``main``) with its log in ``log``; 0 or 1 (UserError)."""
    from megatron.core import parallel_state

    rank0 = int(os.environ.get("RANK", "0")) == 0
    handler = logging.FileHandler(log, mode="w", encoding="utf-8") if rank0 else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        Trainer(parse_config(argv)).train()  # as finetune.py does
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


def main() -> None:
    spec = Path(sys.argv[1])
    setup_logging()
    try:
        for run in json.loads(spec.read_text(encoding="utf-8")):
            code = run_one(run["argv"], spec.parent / f"{run['name']}.log")
            if int(os.environ.get("RANK", "0")) == 0:
                mtimes = {path: os.stat(path).st_mtime_ns for path in run.get("stat", ())
                          if os.path.exists(path)}
                (spec.parent / f"{run['name']}.json").write_text(
                    json.dumps({"returncode": code, "mtimes": mtimes}))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
