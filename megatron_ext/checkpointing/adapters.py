"""Adapter-only checkpoints: which base they belong to, and the base they are used with.

Why: a LoRA/DoRA run saves only its adapters (and their optimizer state), a
few MB beside a base of many GB. Such a checkpoint is useless, or silently
wrong, with another base, so its ``run_config.json`` records the base: the
path the user gave (``load``), the checkpoint directory the weights came from
(``checkpoint``; for a Hugging Face model, its import in the cache) and an
identity of that directory's content. A resume, an export or a generation
recomputes the identity and refuses a base that differs.

The identity hashes every file's name and size and sixteen 64 KiB samples of
its content spread over it: reading a 14 GB base takes well under a second,
and two different weight files (another finetune of the same architecture)
differ in every sample.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from megatron_ext.checkpointing.forms import is_legacy, is_unsharded
from megatron_ext.checkpointing.run_config import load_run_config
from megatron_ext.checkpointing.tracker import iteration_dir, latest_iteration
from megatron_ext.errors import CheckpointError

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
IGNORED = {"run_config.json"}  # rewritten by tools; the weights are what must match


def concrete_checkpoint(path: str) -> str:
    """The directory holding the weights ``path`` stands for: an unsharded or legacy
    root itself, a dist run directory's latest ``iter_*``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"base checkpoint {path} does not exist")
    if is_unsharded(path) or is_legacy(path) or os.path.isfile(
            os.path.join(path, ".metadata")):
        return os.path.abspath(path)
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"{path}: no checkpoint found")
    return os.path.abspath(iteration_dir(path, iteration))


def content_identity(directory: str) -> str:
    """A sampled content hash of every file under ``directory`` (see the module doc)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name in IGNORED:
                continue
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            digest.update(f"{os.path.relpath(path, directory)}\0{size}\0".encode())
            with open(path, "rb") as handle:
                for index in range(SAMPLES if size > SAMPLES * SAMPLE_BYTES else 1):
                    handle.seek(index * (size - SAMPLE_BYTES) // max(1, SAMPLES - 1)
                                if size > SAMPLES * SAMPLE_BYTES else 0)
                    digest.update(handle.read(SAMPLE_BYTES if size > SAMPLES * SAMPLE_BYTES
                                              else size))
    return digest.hexdigest()


def base_record(load: str, checkpoint: str) -> dict:
    """What an adapter checkpoint records about its base (``load``: the user's --load;
    ``checkpoint``: the checkpoint the base weights were loaded from)."""
    concrete = concrete_checkpoint(checkpoint)
    return {"load": os.path.abspath(load), "checkpoint": os.path.abspath(checkpoint),
            "weights": concrete, "identity": content_identity(concrete)}


def check_base(record: dict, checkpoint: str, adapters: str) -> None:
    """Refuse ``checkpoint`` as the base of the adapters in ``adapters`` unless it is the
    one they were trained on."""
    concrete = concrete_checkpoint(checkpoint)
    if content_identity(concrete) != record.get("identity"):
        raise CheckpointError(
            f"the adapters in {adapters} were trained on the base {record.get('load')} "
            f"(weights {record.get('weights')}), and {checkpoint} is another model (its "
            "content differs): give the same base as --load, or start new adapters with "
            "another --save")


def adapter_run_config(path: str) -> Optional[dict]:
    """The run config of the adapter checkpoint at ``path`` (a run directory or one
    ``iter_*`` of it); None when ``path`` holds no checkpoint or a full one."""
    if not os.path.isdir(path) or is_unsharded(path) or is_legacy(path):
        return None
    directory = path
    if not os.path.isfile(os.path.join(path, ".metadata")):
        iteration = latest_iteration(path)
        if iteration is None:
            return None
        directory = iteration_dir(path, iteration)
    try:
        run_config = load_run_config(directory, missing_ok=True)
    except CheckpointError:
        return None
    return run_config if run_config and (run_config.get("peft") or {}).get("peft") else None


def base_of(run_config: dict, adapters: str, base: Optional[str] = None) -> str:
    """The base checkpoint of an adapter checkpoint: ``base`` when given (checked), else
    the recorded one (checked: it may have changed since)."""
    record = run_config.get("base") or {}
    candidate = base or record.get("checkpoint")
    if not candidate:
        raise CheckpointError(f"{adapters}: an adapter checkpoint without a recorded base")
    if not os.path.isdir(candidate):
        raise CheckpointError(
            f"{adapters}: its base checkpoint {candidate} (from --load {record.get('load')}) "
            "is gone; pass the base model again (the same weights)")
    check_base(record, candidate, adapters)
    return candidate
