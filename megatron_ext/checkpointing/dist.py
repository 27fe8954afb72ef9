"""Distributed checkpoints: save, find, load (any TP/PP), with a ``latest`` tracker.

Why: a checkpoint must resume a run exactly (model, optimizer, LR schedule,
RNG, data position) and must load at another tensor/pipeline layout.
megatron-core's ``dist_checkpointing`` gives the layout-independence; this
module adds what a trainer needs around it:

* ``{dir}/iter_0000100/`` written under a temporary name and renamed when
  every rank has finished, so a crash never leaves a checkpoint that looks
  complete;
* ``{dir}/latest_checkpointed_iteration.txt`` (Megatron-LM's tracker name),
  replaced atomically after the rename;
* ``{dir}/iter_0000100/run_config.json``: the arguments of the run, for
  ``--use_checkpoint_args`` and the tools.

:func:`load_checkpoint` also accepts the other two forms (an unsharded file
set, a legacy Megatron-LLM per-rank checkpoint). A missing, half-written or
unreadable checkpoint is a :class:`CheckpointError` that names the path,
never a silent fresh start.
"""

from __future__ import annotations

import logging
import os
import random
import re
import warnings
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from megatron_ext.checkpointing.legacy import is_legacy, read_legacy_checkpoint
from megatron_ext.checkpointing.pickles import check_dist_checkpoint
from megatron_ext.checkpointing.run_config import load_run_config, write_run_config
from megatron_ext.checkpointing.state import (
    OPTIMIZER_METADATA,
    Progress,
    TrainState,
    check_model_matches,
    load_model_weights,
    restore_training_state,
    without_extra_state,
)
from megatron_ext.checkpointing.tracker import (
    TRACKER,
    iteration_dir,
    latest_iteration,
    loading,
    write_tracker,
)
from megatron_ext.checkpointing.unsharded import TensorDictReader, is_unsharded, load_unsharded
from megatron_ext.checkpointing.writer import keep_writes_in_process
from megatron_ext.errors import CheckpointError
from megatron_ext.io import STAGING_SUFFIX, StagedDirectory

logger = logging.getLogger(__name__)

SHARDED_TENSOR_DEPRECATION = "Please use DTensor instead and we are deprecating ShardedTensor"
# where torch reports it from: its DCP code that megatron-core's torch_dist format drives,
# megatron-core itself, and (on CPU) the compat layer's torch-function mode
_SHARDED_TENSOR_CALLERS = (r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing"
                           r"|megatron_ext\.compat)(\.|$)")


def quiet_sharded_tensor_deprecation() -> None:
    """Hide torch's ``FutureWarning`` about ShardedTensor where megatron-core's checkpoints
    cause it, and nothing else.

    Why: megatron-core's ``torch_dist`` checkpoints are torch ShardedTensors underneath,
    and torch warns on every load that it deprecates them: a message about megatron-core's
    internals that no user of ours can act on. Installed when this module is imported (the
    one place that drives megatron-core's checkpoint code); other warnings, and this one
    from anywhere else, still show.
    """
    warnings.filterwarnings("ignore", message=re.escape(SHARDED_TENSOR_DEPRECATION),
                            category=FutureWarning, module=_SHARDED_TENSOR_CALLERS)


quiet_sharded_tensor_deprecation()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(train: TrainState, include_optimizer: bool, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = train.layout
    model_state = train.model_state()
    state = {"model": model_state}
    if include_optimizer:
        if loading:
            _with_optimizer_state(train.optimizer)
        state["optimizer"] = train.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=OPTIMIZER_METADATA)
        # context-parallel ranks hold the same RNG streams as their data-parallel peers
        # (seeded by TP rank only): replicas, like those
        cp, cp_rank = getattr(layout, "cp", 1), getattr(layout, "cp_rank", 0)
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(), (layout.pp, layout.tp), (layout.pp_rank, layout.tp_rank),
            replica_id=layout.dp_rank * cp + cp_rank)
    return state


def _with_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its state tensors, as
    Megatron-LM does before it loads a checkpoint into one.

    Why: megatron-core 0.16.1's ``DistributedOptimizer.sharded_state_dict(is_loading=True)``
    starts from ``state_dict()``, which reads Adam's step from the state tensors
    (``distrib_optimizer.py:642``: ``assert len(steps) == 1``); a fresh optimizer has
    none. ``_init_optimizer_states_with_dummy_values`` (megatron-core's, for this) makes
    them with one step on zero gradients; the load then replaces all of them. The
    mixed-precision and fp32 optimizers do the same in their own ``sharded_state_dict``
    (``init_state_fn``).
    """
    from megatron_ext.compat.torch_adam import fix_step_state

    fix_step_state()  # megatron-core's own load of torch Adam's step (see there)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not inner.optimizer.state:
            init()


def save_checkpoint(root: str, train: TrainState, progress: Progress, run_config: dict) -> str:
    """Save everything needed to resume; returns the checkpoint directory.

    ``run_config`` is written beside the weights as ``run_config.json``.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    layout = train.layout
    final = iteration_dir(root, progress.iteration)
    staged = None
    if layout.rank == 0:
        os.makedirs(root, exist_ok=True)
        staged = StagedDirectory(final, overwrite=True)
    dist.barrier()
    state = _sharded_state(train, include_optimizer=True, loading=False)
    state["common"] = {
        **asdict(progress),
        "scheduler": train.scheduler.state_dict(),
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                   "cp": getattr(layout, "cp", 1)},
    }
    keep_writes_in_process()  # no helper process (see writer.py)
    dist_checkpointing.save(state, final + STAGING_SUFFIX)  # rank 0 made it
    dist.barrier()
    if staged is not None:
        write_run_config(staged.path, run_config)
        # never a moment without a complete checkpoint for the tracker to name
        staged.publish(on_published=lambda: write_tracker(root, progress.iteration))
    dist.barrier()
    return final


def load_checkpoint(root: str, train: TrainState, weights_only: bool,
                    allow_missing: bool = False) -> Optional[tuple[int, Progress]]:
    """Restore ``train`` from the latest checkpoint in ``root``.

    Returns (checkpoint iteration, progress to resume from; a fresh one when
    ``weights_only``), or None when ``root`` holds no checkpoint and
    ``allow_missing`` (the run's own ``--save`` directory on its first
    launch); any other absence is a :class:`CheckpointError`.
    """
    from megatron.core import dist_checkpointing

    layout = train.layout
    if os.path.isdir(root) and is_unsharded(root):
        return load_unsharded(root, train, weights_only)
    if is_legacy(root):
        legacy = read_legacy_checkpoint(root)
        check_model_matches(legacy.model_args, train.model, root)
        iteration = legacy.iteration if isinstance(legacy.iteration, int) else 0
        return load_unsharded(root, train, weights_only,
                              TensorDictReader(root, legacy.state, iteration))
    iteration = latest_iteration(root) if os.path.isdir(root) else None
    if iteration is None:
        if allow_missing:
            if layout.is_logger:
                logger.info("no checkpoint in %s yet: starting from scratch", root)
            return None
        raise CheckpointError(
            f"--load {root}: no checkpoint found (no {TRACKER}); check the path, or drop --load "
            "to start from scratch")
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {directory} "
                              "does not exist (deleted or not finished)")
    saved_model = (load_run_config(directory, missing_ok=True) or {}).get("model")
    if saved_model:
        check_model_matches(saved_model, train.model, directory)
    state = _sharded_state(train, include_optimizer=not weights_only, loading=True)
    state["model"] = without_extra_state(state["model"])
    # megatron-core unpickles .metadata, common.pt and these objects unrestricted: read first
    common = check_dist_checkpoint(directory, _object_keys(state))
    if not weights_only:
        saved = _saved_layout(common)
        if saved.pop("weights_only"):
            raise CheckpointError(f"{directory} holds weights only (no optimizer state): start "
                                  "from it with --finetune")
        if saved != {"tp": layout.tp, "pp": layout.pp, "cp": getattr(layout, "cp", 1)}:
            state.pop("rng_state")  # RNG streams belong to a layout; weights and optimizer do not
            if layout.is_logger:
                logger.info("checkpoint layout %s differs from this run's: RNG state not "
                            "restored", saved)
    with loading(directory):
        loaded = dist_checkpointing.load(state, directory)  # common state comes back merged
    load_model_weights(train.model, loaded["model"], directory, train.parts)
    if weights_only:
        return iteration, Progress()
    progress = restore_training_state(train, loaded)
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return iteration, progress


def _object_keys(state: dict) -> set[str]:
    """Keys of the ``ShardedObject`` entries (pickled objects) that loading ``state`` reads."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {v.key for v in nested_values(state) if isinstance(v, ShardedObject)}


def _saved_layout(common: dict) -> dict:
    saved = common.get("common", {})
    layout = saved.get("layout", {})
    return {"tp": layout.get("tp"), "pp": layout.get("pp"),
            # written before context parallelism: CP 1; a resharded checkpoint: None
            "cp": layout.get("cp", 1 if layout.get("tp") is not None else None),
            "weights_only": bool(saved.get("weights_only"))}
