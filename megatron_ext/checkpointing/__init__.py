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

A missing, half-written or unreadable checkpoint is a :class:`CheckpointError`
that names the path, never a silent fresh start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from megatron_ext.errors import UserError

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's layout-independent format: one state tensor per parameter,
# as the plain optimizer saves it. megatron-core 0.16's default for it
# ("fully_sharded_model_space") builds flattened shards that 0.16 itself refuses.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RUN_CONFIG = "run_config.json"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or unreadable."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """Iteration named by the tracker, or None when ``root`` holds no checkpoint."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}, expected an iteration "
                              "number); fix it by hand or point --load at another directory")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, f"{TRACKER}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


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


@dataclass
class Progress:
    """Where a run is: what a resume needs besides weights and optimizer state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


@dataclass
class TrainState:
    """The objects a checkpoint saves and restores.

    ``model`` is the unwrapped megatron-core module (``sharded_state_dict``);
    ``optimizer`` and ``scheduler`` may be None for weights-only use (tools).
    ``layout`` needs ``rank``, ``tp``, ``pp``, ``dp``, ``tp_rank``, ``pp_rank``,
    ``dp_rank`` and ``is_logger``.
    """

    model: object
    layout: object
    optimizer: Optional[object] = None
    scheduler: Optional[object] = None


def _sharded_state(train: TrainState, include_optimizer: bool, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = train.layout
    model_state = train.model.sharded_state_dict()
    state = {"model": model_state}
    if include_optimizer:
        state["optimizer"] = train.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=OPTIMIZER_METADATA)
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(), (layout.pp, layout.tp), (layout.pp_rank, layout.tp_rank),
            replica_id=layout.dp_rank)
    return state


def save_checkpoint(root: str, train: TrainState, progress: Progress, run_config: dict) -> str:
    """Save everything needed to resume; returns the checkpoint directory.

    ``run_config`` is written beside the weights as ``run_config.json``.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    layout = train.layout
    final = iteration_dir(root, progress.iteration)
    staging = final + ".incomplete"
    if layout.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state(train, include_optimizer=True, loading=False)
    state["common"] = {
        **asdict(progress),
        "scheduler": train.scheduler.state_dict(),
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
    }
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if layout.rank == 0:
        with open(os.path.join(staging, RUN_CONFIG), "w", encoding="utf-8") as handle:
            json.dump(run_config, handle, indent=2)
        # never a moment without a complete checkpoint for the tracker to name
        previous = final + ".previous"
        if os.path.isdir(final):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(staging, final)
        write_tracker(root, progress.iteration)
        shutil.rmtree(previous, ignore_errors=True)
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

    from megatron_ext.checkpointing.unsharded import is_unsharded, load_unsharded

    layout = train.layout
    if os.path.isdir(root) and is_unsharded(root):
        return load_unsharded(root, train, weights_only)
    from megatron_ext.checkpointing.legacy_detect import is_legacy

    if is_legacy(root):
        from megatron_ext.checkpointing.legacy import read_legacy_checkpoint
        from megatron_ext.checkpointing.unsharded import TensorDictReader

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
    saved_config = os.path.join(directory, RUN_CONFIG)
    if os.path.exists(saved_config):
        try:
            with open(saved_config, encoding="utf-8") as handle:
                saved_model = json.load(handle).get("model")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {saved_config}: {exc}") from None
        if saved_model:
            check_model_matches(saved_model, train.model, directory)
    state = _sharded_state(train, include_optimizer=not weights_only, loading=True)
    state["model"] = _without_extra_state(state["model"])
    if not weights_only:
        saved = _saved_layout(directory)
        if saved.pop("weights_only"):
            raise CheckpointError(f"{directory} holds weights only (no optimizer state): start "
                                  "from it with --finetune")
        if saved != {"tp": layout.tp, "pp": layout.pp}:
            state.pop("rng_state")  # RNG streams belong to a layout; weights and optimizer do not
            if layout.is_logger:
                logger.info("checkpoint layout %s differs from this run's: RNG state not "
                            "restored", saved)
    try:
        loaded = dist_checkpointing.load(state, directory)  # common state comes back merged
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {directory} cannot be loaded ({type(exc).__name__}: {detail}); it is "
            "damaged or was written for a different model shape (see its run_config.json)"
        ) from None
    _load_model_weights(train.model, loaded["model"], directory)
    if weights_only:
        return iteration, Progress()
    train.optimizer.load_state_dict(loaded["optimizer"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    common = loaded["common"]
    train.scheduler.load_state_dict(common["scheduler"])
    return iteration, Progress(common["iteration"], common["consumed_samples"],
                               common["consumed_tokens"])


def check_model_matches(saved_model: dict, model, source: str) -> None:
    """Refuse to load weights into a model whose architecture differs from the checkpoint's.

    Shapes alone do not catch everything: another RoPE base, norm epsilon or
    window computes a different function with the same tensors, and fewer
    layers would load a prefix of the model. ``saved_model`` is the run
    config's ``model`` section; ``model`` the megatron-core ``GPTModel``.
    """
    if not saved_model:
        return
    from megatron_ext.models.builder import transformer_config
    from megatron_ext.models.config import ModelArgs, PrecisionArgs
    from megatron_ext.parallel import ParallelArgs

    args = ModelArgs.from_dict(saved_model).resolved()
    want = transformer_config(args, ParallelArgs(), PrecisionArgs())
    have = model.config
    names = {"num_layers": "--num_layers", "hidden_size": "--hidden_size",
             "num_attention_heads": "--num_attention_heads",
             "num_query_groups": "--num_attention_heads_kv", "ffn_hidden_size": "--ffn_hidden_size",
             "layernorm_epsilon": "--layernorm_epsilon", "window_size": "--sliding_window_size",
             "normalization": "--model_name", "gated_linear_unit": "--model_name"}
    problems = [f"{flag}: checkpoint {getattr(want, key)}, this run {getattr(have, key)}"
                for key, flag in names.items() if getattr(want, key) != getattr(have, key)]
    theta = float(args.rope_theta)
    if getattr(model, "position_embedding_type", None) == "rope" and \
            abs(float(getattr(model, "rotary_base", theta)) - theta) > 1e-6 * theta:
        problems.append(f"--rope_theta: checkpoint {theta:g}, this run {model.rotary_base:g}")
    if bool(args.rope_scaling_factor) != bool(getattr(model, "rotary_scaling", False)):
        problems.append(f"--rope_scaling_factor: checkpoint {args.rope_scaling_factor}, this "
                        "run differs")
    if problems:
        raise CheckpointError(f"{source} was made for another model shape ("
                              + "; ".join(problems) + "); pass --use_checkpoint_args to take the "
                              "checkpoint's, or fix the flags")


def _without_extra_state(model_state: dict) -> dict:
    """The model's sharded state minus ``_extra_state`` objects.

    megatron-core's local (non-Transformer-Engine) layers keep no extra state
    (it is None), and checkpoints written by the conversion tools omit it.
    """
    return {k: v for k, v in model_state.items() if not k.endswith("_extra_state")}


def _load_model_weights(model, weights: dict, source: str) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not fit the model (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")


def _saved_layout(directory: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {directory} is unreadable ({exc})") from None
    saved = common.get("common", {})
    layout = saved.get("layout", {})
    return {"tp": layout.get("tp"), "pp": layout.get("pp"),
            "weights_only": bool(saved.get("weights_only"))}


def read_run_config(root: str) -> dict:
    """The run config saved with the latest checkpoint in ``root``."""
    from megatron_ext.checkpointing.unsharded import UnshardedReader, is_unsharded

    if is_unsharded(root):
        return UnshardedReader(root).run_config()
    from megatron_ext.checkpointing.legacy_detect import is_legacy

    if is_legacy(root):
        from megatron_ext.checkpointing.sources import open_checkpoint

        return open_checkpoint(root).run_config
    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {root} (no {TRACKER})")
    path = os.path.join(iteration_dir(root, iteration), RUN_CONFIG)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
