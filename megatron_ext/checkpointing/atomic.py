"""Write a whole output directory under a temporary name; rename it when complete.

Why: a conversion or reshard that fails (bad input, a full disk, Ctrl-C) must
never leave a directory that looks like a finished checkpoint or model.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield ``{out}.incomplete``; on success it replaces ``out``, on error it is removed."""
    from megatron_ext.checkpointing import CheckpointError

    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; choose a new --out or "
                              "pass --overwrite")
    staging = out + ".incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)
