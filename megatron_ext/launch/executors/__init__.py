"""Where an experiment's training runs: one file per executor, each an
:class:`~megatron_ext.launch.executors.base.Executor` (``base.py`` holds the interface).

The registry is the files: ``--executor``'s choices are the names of this package's
modules (found without importing them, so the launcher's options stay light), and
:func:`~megatron_ext.launch.executors.base.get_executor` imports the one asked for.
Adding an executor (a cluster scheduler, another training backend) is one file here.
"""

from __future__ import annotations

import pkgutil

NOT_EXECUTORS = frozenset({"base"})  # the interface, not an executor


def executor_names() -> tuple[str, ...]:
    """Every executor, by ``--executor`` name: the modules of this package."""
    return tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)
                        if info.name not in NOT_EXECUTORS and not info.name.startswith("_")))
