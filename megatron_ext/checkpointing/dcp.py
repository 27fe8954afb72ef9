"""Checkpoints of the Hugging Face backend: ``torch.distributed.checkpoint`` directories
under the same tracker as every other checkpoint.

Layout of ``ROOT/iter_0000100/``: the DCP files (``.metadata``, ``__R_0.distcp``, ...) of
``{"model": ..., "optim": ...}`` (transformers' parameter names, each rank's shards),
``common.json`` (progress and the learning-rate schedule) and ``run_config.json``
(``backend.backend == "hf"``, the model's ``config.json`` under ``hf_model``). It is
written at ``iter_0000100.incomplete`` and renamed when complete, then the tracker
``latest_checkpointed_iteration.txt`` names it: a kill at any moment leaves the previous
checkpoint named and whole. DCP reshards on load, so a run resumes at any
data-parallel size.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from megatron_ext.checkpointing.forms import checkpoint_directory
from megatron_ext.checkpointing.run_config import load_run_config, write_run_config
from megatron_ext.checkpointing.tracker import TRACKER, iteration_dir, loading, write_tracker
from megatron_ext.errors import CheckpointError
from megatron_ext.io import STAGING_SUFFIX, StagedDirectory, read_json, write_json

if TYPE_CHECKING:
    from megatron_ext.checkpointing.state import Progress

COMMON = "common.json"


def is_hf_backend_run(run_config: Optional[dict]) -> bool:
    """Whether a run config is the Hugging Face backend's."""
    return bool(run_config) and (run_config.get("backend") or {}).get("backend") == "hf"


def hf_backend_checkpoint(load: Optional[str]) -> Optional[str]:
    """The newest iteration directory of ``load`` (a run directory or one iteration's) when
    it is a Hugging Face backend checkpoint; else None."""
    if not load or not os.path.isdir(load):
        return None
    try:  # (a damaged checkpoint of another form is its own loader's to report)
        directory = (load if os.path.isfile(os.path.join(load, COMMON))
                     else checkpoint_directory(load))
        if directory is None or not os.path.isfile(os.path.join(directory, COMMON)):
            return None
        run_config = load_run_config(directory, missing_ok=True)
    except CheckpointError:
        return None
    return directory if is_hf_backend_run(run_config) else None


def save_dcp(root: str, state: dict, progress, common: dict, run_config: dict,
             rank: int) -> str:
    """Save ``state`` (the model's and the optimizer's state dicts of every rank) as
    iteration ``progress.iteration`` (a :class:`~megatron_ext.checkpointing.state.Progress`)
    of ``root``; every rank calls it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = iteration_dir(root, progress.iteration)
    staged = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        staged = StagedDirectory(final, overwrite=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=final + STAGING_SUFFIX)
    if staged is not None:
        write_json(os.path.join(staged.path, COMMON),
                   {"iteration": progress.iteration,
                    "consumed_samples": progress.consumed_samples,
                    "consumed_tokens": progress.consumed_tokens, **common})
        write_run_config(staged.path, run_config)
        staged.publish(on_published=lambda: write_tracker(root, progress.iteration))
    dist.barrier()
    return final


def load_dcp(load: str, state: dict) -> tuple[str, "Progress", dict]:
    """Load the newest checkpoint of ``load`` into ``state`` in place; returns (its
    directory, its progress, its common state)."""
    import torch.distributed.checkpoint as dcp

    from megatron_ext.checkpointing.state import Progress

    directory = hf_backend_checkpoint(load)
    if directory is None:
        raise CheckpointError(f"--load {load}: no checkpoint of the hf backend there (no "
                              f"{TRACKER} naming one); check the path")
    common = read_json(os.path.join(directory, COMMON), CheckpointError)
    with loading(directory):
        dcp.load(state, checkpoint_id=directory)
    progress = Progress(common["iteration"], common["consumed_samples"],
                        common["consumed_tokens"])
    return directory, progress, common


def consolidated_weights(directory: str) -> dict:
    """The full model weights of a checkpoint directory, in one process (no process
    group): transformers' names and tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(directory).read_metadata()
    import torch

    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    return {key[len("model."):]: tensor for key, tensor in state.items()}


def describe(directory: str) -> str:
    """What a checkpoint of the hf backend is, in one line (for the tools that cannot
    take it)."""
    run_config = load_run_config(directory)
    common = read_json(os.path.join(directory, COMMON), CheckpointError)
    model = run_config.get("hf_model") or {}
    layout = common.get("layout") or {}
    what = "adapters only" if "base" in run_config else "the whole model"
    return (f"{directory} is a checkpoint of the Hugging Face backend (torch.distributed."
            f"checkpoint of {(model.get('config') or {}).get('model_type')} from "
            f"{model.get('path')}: {what}, iteration {common.get('iteration')}, saved at DP "
            f"{layout.get('dp')} x TP {layout.get('tp')})")
