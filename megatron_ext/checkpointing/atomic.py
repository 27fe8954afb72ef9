"""Write a whole output directory under a temporary name; rename it when complete.

Why: a conversion or reshard that fails (bad input, a full disk, Ctrl-C) must
never leave a directory that looks like a finished checkpoint or model.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


def check_out_free(out: str, overwrite: bool) -> None:
    """Refuse an existing, non-empty output directory unless ``overwrite`` (checked early,
    before hours of work)."""
    from megatron_ext.checkpointing import CheckpointError

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; choose a new --out or "
                              "pass --overwrite")


@contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield ``{out}.incomplete``; on success it replaces ``out``, on error it is removed."""
    out = os.path.abspath(out)
    check_out_free(out, overwrite)
    staging = out + ".incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)


def publish(staging: str, out: str) -> None:
    """Replace ``out`` by the complete ``staging`` directory.

    The old ``out`` is renamed aside first and deleted only once the new one
    is in place, so a failure at any point leaves one complete directory
    (the old or the new one), never neither.
    """
    old = None
    if os.path.exists(out):
        old = f"{out}.old.{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
