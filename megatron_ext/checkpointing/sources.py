"""Any checkpoint the project reads, as unsharded tensors a layer at a time.

Why: export to Hugging Face and the reshard tool must accept whatever the
user has (a ``dist_checkpointing`` run directory at any TP/PP, an unsharded
file set, a legacy Megatron-LM/Megatron-LLM per-rank checkpoint) and must
not need the whole model in memory where the format allows streaming.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_ext.checkpointing.forms import run_config_of
from megatron_ext.checkpointing.legacy import is_legacy, read_legacy_checkpoint
from megatron_ext.checkpointing.pickles import read_dist_common
from megatron_ext.checkpointing.run_config import load_run_config
from megatron_ext.checkpointing.tracker import TRACKER, iteration_dir, latest_iteration
from megatron_ext.checkpointing.unsharded import (
    UnshardedReader,
    is_optimizer_name,
    is_unsharded,
    iter_dist_checkpoint,
)
from megatron_ext.errors import CheckpointError

_LAYER = re.compile(r"^(?:(?:chained_\d+\.)?optimizer\.state\.[^.]+\.)?decoder\.layers\.(\d+)\.")


@dataclass
class CheckpointSource:
    kind: str  # dist | unsharded | legacy | adapters (merged into their base)
    path: str  # the directory holding the tensors
    run_config: dict
    iteration: int
    has_optimizer: bool
    _groups: Callable[[bool], Iterator[dict[str, torch.Tensor]]] = field(repr=False)
    common: Callable[[], dict] = field(repr=False, default=dict)
    vocab_size: Optional[int] = None  # the tokenizer's, where the format records it
    base: Optional["CheckpointSource"] = None  # adapters: the base they are folded into

    def groups(self, include_optimizer: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Non-layer tensors first, then one dict per decoder layer (unsharded names)."""
        return self._groups(include_optimizer)


def group_by_layer(names: list[str]) -> list[list[str]]:
    """Names split into [non-layer names, layer 0 names, layer 1 names, ...]."""
    flat, layers = [], {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            flat.append(name)
    return [flat] + [layers[i] for i in sorted(layers)]


def open_checkpoint(path: str, iteration: Optional[int] = None,
                    base: Optional[str] = None) -> CheckpointSource:
    """Detect the format of ``path`` and open it (``iteration``: default the latest).

    An adapter checkpoint (LoRA/DoRA) opens as its base with the adapters folded into
    the weights (``base``: the base checkpoint, default the recorded one; either way it
    must be the one the adapters were trained on)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path} does not exist")
    if is_unsharded(path):
        return _open_unsharded(path)
    if is_legacy(path):
        return _open_legacy(path, iteration)
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            raise CheckpointError(f"{path}: no checkpoint found (no {TRACKER}, unsharded.json "
                                  "or mp_rank_* directories)")
    directory = iteration_dir(path, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} does not exist")
    run_config = load_run_config(directory)
    if (run_config.get("peft") or {}).get("peft"):
        return _open_adapted(directory, run_config, iteration, base)

    def groups(include_optimizer: bool):
        return iter_dist_checkpoint(directory, include_optimizer)  # plain DCP reads, no group

    @functools.lru_cache(maxsize=1)
    def common() -> dict:
        return read_dist_common(directory)  # restricted: what load_common_state_dict reads

    weights_only = bool((common().get("common") or {}).get("weights_only"))
    return CheckpointSource("dist", directory, run_config, iteration, not weights_only, groups,
                            common)


def adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every adapter tensor of an adapter checkpoint's ``iter_*`` directory (unsharded names)."""
    tensors: dict[str, torch.Tensor] = {}
    for group in iter_dist_checkpoint(directory, include_optimizer=False):
        tensors.update(group)
    return tensors


def _open_adapted(directory: str, run_config: dict, iteration: int,
                  base: Optional[str]) -> CheckpointSource:
    from megatron_ext.checkpointing.adapters import base_of
    from megatron_ext.peft.merge import merge_group

    base_source = open_checkpoint(base_of(run_config, directory, base))
    adapters = adapter_tensors(directory)
    settings = run_config["peft"]
    scaling = float(settings["alpha"]) / int(settings["dim"])

    def groups(include_optimizer: bool):
        if include_optimizer:
            raise CheckpointError(f"{directory}: an adapter checkpoint merged into its base has "
                                  "no optimizer state for the merged weights; merge without it")
        for group in base_source.groups(False):
            yield merge_group(group, adapters, scaling)

    # the merged model is a plain one: it records where it came from, not adapter settings
    merged_config = {k: v for k, v in run_config.items() if k not in ("peft", "base")}
    merged_config["merged_adapters"] = {"adapters": os.path.abspath(directory),
                                        "peft": settings, "base": run_config.get("base")}
    return CheckpointSource("adapters", directory, merged_config, iteration, False, groups,
                            dict, base_source.vocab_size, base=base_source)


def _open_unsharded(path: str) -> CheckpointSource:
    reader = UnshardedReader(path)

    def groups(include_optimizer: bool):
        names = [n for n in reader.names()
                 if include_optimizer or not is_optimizer_name(n)]
        for group in group_by_layer(names):
            yield {name: reader.view(name) for name in group}

    return CheckpointSource("unsharded", path, reader.run_config(),
                            int(reader.meta.get("iteration", 0)), reader.has_optimizer, groups,
                            reader.common, reader.meta.get("vocab_size"))


def _open_legacy(path: str, iteration: Optional[int]) -> CheckpointSource:
    legacy = read_legacy_checkpoint(path, iteration)
    args = vars(legacy.legacy_args) if legacy.legacy_args is not None and not isinstance(
        legacy.legacy_args, dict) else (legacy.legacy_args or {})
    tokenizer = {"tokenizer_type": args.get("tokenizer_type"),
                 "vocab_file": args.get("vocab_file"),
                 "vocab_extra_ids_list": args.get("vocab_extra_ids_list")}

    def groups(include_optimizer: bool):
        for group in group_by_layer(list(legacy.state)):
            yield {name: legacy.state[name] for name in group}

    run_config = {"model": legacy.model_args,
                  "tokenizer": {k: v for k, v in tokenizer.items() if v},
                  "source": {"legacy_checkpoint": os.path.abspath(path), "tp": legacy.tp,
                             "pp": legacy.pp}}
    number = legacy.iteration if isinstance(legacy.iteration, int) else 0  # "release"
    return CheckpointSource("legacy", path, run_config, number, False, groups)


def read_run_config(root: str) -> dict:
    """The run config saved with the latest checkpoint in ``root`` (any of the three forms:
    JSON beside the weights, or a legacy checkpoint's pickled arguments)."""
    run_config = run_config_of(root)
    return open_checkpoint(root).run_config if run_config is None else run_config
