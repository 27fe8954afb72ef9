"""Unsharded checkpoints: one file set, TP=1/PP=1 names, read slice by slice at any layout.

Why a second format beside ``dist_checkpointing``: the converters and the
reshard tool need a form that is written *one tensor group at a time* (a
70B model converts in far less RAM than the model) and that any TP/PP can
start from by reading just its own slices. A directory holds:

* ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``:
  the weights under megatron-core module names with global layer numbers
  (``decoder.layers.7.self_attention.linear_qkv.weight``) and, optionally,
  the optimizer's per-parameter state under ``optimizer.state.<stat>.<name>``;
* ``unsharded.json``: the format marker, tokenizer vocabulary size, iteration;
* ``common.pt``: the non-tensor training state (LR scheduler, optimizer
  param groups, data position) when optimizer state is included;
* ``run_config.json``: the run's arguments (``--use_checkpoint_args``).

A model at any TP/PP loads it through its own ``sharded_state_dict``: every
``ShardedTensor`` says which global tensor and which slice it is, so no
per-parameter slicing rule is written here. Vocabulary rows are adapted to
the model's padding (extra rows zero; only padding rows ever dropped).

This module also moves whole checkpoints between this format and
``dist_checkpointing`` directories, layer by layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Iterator, Optional

import torch

from megatron_ext.checkpointing.forms import UNSHARDED_MARKER as MARKER
from megatron_ext.checkpointing.forms import is_unsharded  # noqa: F401 - re-exported
from megatron_ext.checkpointing.pickles import (
    RefusedFileError,
    load_pickled,
    read_dist_metadata,
    safe_filesystem_reader,
)
from megatron_ext.checkpointing.run_config import load_run_config, write_run_config
from megatron_ext.checkpointing.state import (
    OPTIMIZER_METADATA,
    Progress,
    check_model_matches,
    load_model_weights,
    restore_training_state,
)
from megatron_ext.checkpointing.writer import keep_writes_in_process
from megatron_ext.errors import CheckpointError
from megatron_ext.io import StagedDirectory, write_json
from megatron_ext.safetensors_io import (
    SafetensorsError,
    SafetensorsIndex,
    ShardedSafetensorsWriter,
)

logger = logging.getLogger(__name__)

FORMAT = "megatron_ext.unsharded"
COMMON = "common.pt"
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
# optimizer state; ``chained_N.``: a chain of optimizers (a mixture of experts' dense and
# expert weights: megatron-core's ChainedOptimizer prefixes their keys)
_OPTIMIZER = re.compile(r"^((?:chained_\d+\.)?optimizer\.state\.[^.]+\.)(.+)$")
_OPTIMIZER_KEY = re.compile(r"^(?:chained_\d+\.)?optimizer\.")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# a mixture of experts: checkpoint keys stack the experts of a layer on a second axis
# (megatron-core's SequentialMLP), our file set names each expert's module
EXPERTS_KEY = "mlp.experts.experts."
_EXPERT_MODULE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- names
def _layer_keys_map() -> dict[str, str]:
    """megatron-core's module-prefix -> checkpoint-prefix map of the layer spec."""
    # in the function: models.attention imports megatron-core, which importing the
    # checkpointing package must not cost
    from megatron_ext.models.attention import portable_layer_spec

    return dict(portable_layer_spec("RMSNorm", use_flash_attn=False)
                .submodules.sharded_state_dict_keys_map)


def unsharded_name(checkpoint_key: str, layer: Optional[int],
                   expert: Optional[int] = None) -> str:
    """``decoder.layers.mlp.linear_fc1.layer_norm_weight`` (+ layer 3) -> module name.

    Checkpoint keys stack all layers in one global tensor (leading axis) and
    use Transformer-Engine style names for the fused norms; our file set uses
    the plain module names, one tensor per layer (and per expert: the experts of a
    mixture-of-experts layer are stacked on a second axis, ``expert`` is the index).
    """
    match = _OPTIMIZER.match(checkpoint_key)
    prefix, rest = (match.group(1), match.group(2)) if match else ("", checkpoint_key)
    numbered = _LAYER_NAME.match(rest)  # a layer of its own (non-homogeneous layers)
    if numbered:
        layer, rest = int(numbered.group(1)), f"decoder.layers.{numbered.group(2)}"
    if rest.startswith("decoder.layers."):
        if layer is None:
            raise ValueError(f"{checkpoint_key}: a layer tensor needs its layer number")
        suffix = rest[len("decoder.layers."):]
        if suffix.startswith(EXPERTS_KEY):
            if expert is None:
                raise ValueError(f"{checkpoint_key}: an expert's tensor needs its expert number")
            suffix = f"mlp.experts.local_experts.{expert}.{suffix[len(EXPERTS_KEY):]}"
        for module_prefix, key_prefix in _layer_keys_map().items():
            if suffix.startswith(key_prefix):
                suffix = module_prefix + suffix[len(key_prefix):]
                break
        rest = f"decoder.layers.{layer}.{suffix}"
    return prefix + rest


def layer_in_key(checkpoint_key: str) -> Optional[int]:
    """The layer a checkpoint key names itself (``decoder.layers.3.…``: megatron-core's keys
    when the layers differ, e.g. dense and mixture-of-experts layers), else None (stacked
    on the leading axis)."""
    match = _OPTIMIZER.match(checkpoint_key)
    numbered = _LAYER_NAME.match(match.group(2) if match else checkpoint_key)
    return int(numbered.group(1)) if numbered else None


def expert_of(name: str) -> tuple[str, Optional[int]]:
    """An unsharded name -> (its checkpoint key, its expert number or None): the expert part
    of :func:`checkpoint_key`."""
    key, layer = checkpoint_key(name)
    match = _OPTIMIZER.match(name)
    layer_match = _LAYER_NAME.match(match.group(2) if match else name)
    expert = _EXPERT_MODULE.match(layer_match.group(2)) if layer_match else None
    if expert is None:
        return key, None
    prefix = match.group(1) if match else ""
    return f"{prefix}decoder.layers.{EXPERTS_KEY}{expert.group(2)}", int(expert.group(1))


def checkpoint_key(name: str) -> tuple[str, Optional[int]]:
    """Inverse of :func:`unsharded_name`: (checkpoint key, layer number or None)."""
    match = _OPTIMIZER.match(name)
    prefix, rest = (match.group(1), match.group(2)) if match else ("", name)
    layer_match = _LAYER_NAME.match(rest)
    if not layer_match:
        return prefix + rest, None
    layer, suffix = int(layer_match.group(1)), layer_match.group(2)
    for module_prefix, key_prefix in _layer_keys_map().items():
        if suffix.startswith(module_prefix):
            suffix = key_prefix + suffix[len(module_prefix):]
            break
    return f"{prefix}decoder.layers.{suffix}", layer


def is_optimizer_name(name: str) -> bool:
    """An optimizer state's tensor (a chained optimizer's too), not a model's."""
    return bool(_OPTIMIZER_KEY.match(name))


def _is_vocab_tensor(name: str) -> bool:
    match = _OPTIMIZER.match(name)
    return (match.group(2) if match else name) in VOCAB_TENSORS


# ---------------------------------------------------------------- writing
class UnshardedWriter:
    """Builds an unsharded checkpoint in ``{out}.incomplete``; ``finish`` renames it.

    Use as a context manager: an exception removes the staging directory, so
    a failed conversion never leaves something that looks like a checkpoint.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 2**30, overwrite: bool = False):
        self.staged = StagedDirectory(out_dir, overwrite)
        self.out_dir = self.staged.out
        self.staging = self.staged.path
        self.tensors = ShardedSafetensorsWriter(self.staging, "model", max_shard_bytes)
        self.names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors.add(name, tensor)
        self.names.append(name)

    def finish(self, meta: dict, run_config: Optional[dict] = None,
               common: Optional[dict] = None) -> str:
        self.tensors.finish()
        marker = {"format": FORMAT, "version": 1, "has_optimizer": common is not None, **meta}
        write_json(os.path.join(self.staging, MARKER), marker)
        if run_config is not None:
            write_run_config(self.staging, run_config)
        if common is not None:
            torch.save(common, os.path.join(self.staging, COMMON))
        return self.staged.publish()

    def abort(self) -> None:
        self.staged.discard()

    def __enter__(self) -> "UnshardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# ---------------------------------------------------------------- reading
class UnshardedReader:
    """An unsharded checkpoint directory; tensors come as zero-copy file views."""

    def __init__(self, root: str):
        self.root = root
        try:
            with open(os.path.join(root, MARKER), encoding="utf-8") as handle:
                self.meta = json.load(handle)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{root}: not an unsharded checkpoint ({MARKER}: {exc})") from None
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{root}/{MARKER}: unknown format {self.meta.get('format')!r}")
        try:
            self.index = SafetensorsIndex(root, "model")
        except SafetensorsError as exc:
            raise CheckpointError(str(exc)) from None

    @property
    def has_optimizer(self) -> bool:
        return bool(self.meta.get("has_optimizer"))

    def names(self) -> list[str]:
        return list(self.index.names())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index.info(name).shape

    def view(self, name: str) -> torch.Tensor:
        return self.index.view(name)

    def run_config(self) -> dict:
        return load_run_config(self.root)

    def common(self) -> dict:
        if not self.has_optimizer:
            return {}
        try:  # restricted: a name outside the allow-list is refused, never imported
            return load_pickled(os.path.join(self.root, COMMON))
        except RefusedFileError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.root}/{COMMON} is unreadable ({exc})") from None


def _slice_for(reader, sh) -> torch.Tensor:
    """The part of the stored tensor that ShardedTensor ``sh`` stands for.

    ``reader`` needs ``view(name)`` (KeyError when absent) and ``root``.
    """
    prepend = sh.prepend_axis_num
    axes = list(sh.global_offset[:prepend])  # [layer,] [expert] (an MoE layer's experts)
    layer = layer_in_key(sh.key)
    if layer is None and axes:
        layer = axes.pop(0)
    expert = axes[0] if axes else None
    name = unsharded_name(sh.key, layer, expert)
    if sh.flattened_range is not None:
        raise CheckpointError(f"{name}: flattened (distributed-optimizer) shards cannot be read from an "
                     "unsharded checkpoint; load it without --use_distributed_optimizer")
    try:
        stored = reader.view(name)
    except KeyError:
        raise CheckpointError(f"{reader.root} has no tensor {name}: it was written for a different model "
                     "(see its run_config.json) or without optimizer state") from None
    want = tuple(sh.global_shape[prepend:])
    offsets = sh.global_offset[prepend:]
    shape = tuple(sh.data.shape)
    if tuple(stored.shape) != want:
        rows_only = (len(want) == stored.dim() and want[1:] == tuple(stored.shape[1:])
                     and _is_vocab_tensor(name))
        if not rows_only:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(stored.shape)} but the model needs "
                         f"{want}; the model arguments differ from the checkpoint's "
                         "(use --use_checkpoint_args)")
    out = torch.zeros(shape, dtype=stored.dtype)
    index = tuple(slice(o, min(o + s, n)) for o, s, n in zip(offsets, shape, stored.shape))
    if all(i.stop > i.start for i in index):
        part = stored[index]
        out[tuple(slice(0, i.stop - i.start) for i in index)] = part
    return out


class TensorDictReader:
    """Unsharded tensors held in memory (a legacy checkpoint), read like a file set."""

    def __init__(self, root: str, tensors: dict[str, torch.Tensor], iteration: int = 0):
        self.root, self.tensors = root, tensors
        self.meta = {"iteration": iteration, "has_optimizer": False}
        self.has_optimizer = False

    def view(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def common(self) -> dict:
        return {}


def load_unsharded(root: str, train, weights_only: bool, reader=None):
    """Load an unsharded checkpoint into ``train`` (a ``TrainState``) at its layout.

    ``reader`` replaces the file set (e.g. a :class:`TensorDictReader`).
    Returns (iteration, Progress) like ``load_checkpoint``.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factory_merges,
    )
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    if reader is None:
        reader = UnshardedReader(root)
        check_model_matches(reader.run_config().get("model") or {}, train.model, root)
    if not weights_only and not reader.has_optimizer:
        raise CheckpointError(f"{root} holds weights only (no optimizer state): start from it with "
                     "--finetune, or merge a checkpoint with its optimizer state")
    state = {"model": train.model_state()}
    if not weights_only:
        state["optimizer"] = train.optimizer.sharded_state_dict(
            state["model"], is_loading=True, metadata=OPTIMIZER_METADATA)
    state, nonpersistent, factories = load_preprocess(state)
    if not weights_only:  # plain values (param groups) come from the saved common state
        from megatron.core.dist_checkpointing.utils import extract_sharded_base

        state, _ = extract_sharded_base(state)

    def fill(value):
        if isinstance(value, ShardedTensor):
            # into the model's (or optimizer's) own tensor: no second copy of the model
            with torch.no_grad():
                value.data.copy_(_slice_for(reader, value))
            return value.data
        if isinstance(value, ShardedObject):
            return value.data  # megatron-core's local layers keep no extra state
        return value

    dict_list_map_inplace(fill, state)
    common = {} if weights_only else reader.common()
    merge(common, nonpersistent)  # e.g. the optimizer's param ids per group
    merge(common, state)
    loaded = apply_factory_merges(common, factories)
    load_model_weights(train.model, loaded["model"], root, train.parts)
    iteration = int(reader.meta.get("iteration", 0))
    if weights_only:
        return iteration, Progress()
    return iteration, restore_training_state(train, loaded)


# ---------------------------------------------------------------- dist <-> unsharded
def _is_stacked(key: str) -> bool:
    match = _OPTIMIZER.match(key)
    rest = match.group(2) if match else key
    return rest.startswith("decoder.layers.") and not rest[len("decoder.layers."):][:1].isdigit()


def _slice_planner(offsets: dict[str, tuple[int, ...]]):
    """A PyTorch DCP load planner that reads one box of each tensor (e.g. one layer).

    Why not ``dist_checkpointing.load``: for a single process it assumes the
    process holds *every* fragment of a sharded request, so it cannot read
    just one layer of the stacked layer tensors. The checkpoint is standard
    PyTorch DCP underneath; DCP reads any box natively.
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            items = []
            for fqn, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]),
                                             sizes=tensor.shape)
                items += create_read_items_for_chunk_list(
                    fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return SlicePlanner()


def iter_dist_checkpoint(directory: str, include_optimizer: bool = True
                         ) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors of a ``dist_checkpointing`` directory in unsharded names, a layer at a time.

    Yields the non-layer tensors first, then one dict per layer, so memory
    stays near one layer whatever layout saved the checkpoint.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        whole = read_dist_metadata(directory)  # read once, for every part (see the reader)
        metadata = whole.state_dict_metadata
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as exc:
        raise CheckpointError(f"checkpoint {directory} is unreadable ({type(exc).__name__}: "
                     f"{str(exc)[:200]})") from None
    keys = [k for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)
            and (include_optimizer or not is_optimizer_name(k))]
    own = {k: layer_in_key(k) for k in keys}  # a layer's own tensors (non-homogeneous)
    flat = [k for k in keys if not _is_stacked(k) and own[k] is None]
    stacked = [k for k in keys if _is_stacked(k)]
    layers = {metadata[k].size[0] for k in stacked}
    if len(layers) > 1:
        raise CheckpointError(f"{directory}: layer tensors disagree on the number of layers ({layers})")
    numbered = {layer for layer in own.values() if layer is not None}
    if numbered:
        layers = {max(layers | {max(numbered) + 1})}

    def load(request: dict, offsets: dict) -> dict:
        try:
            dcp_load(request, storage_reader=safe_filesystem_reader(directory, whole),
                     planner=_slice_planner(offsets), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise CheckpointError(f"checkpoint {directory} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200]}); it is damaged or incomplete") from None
        return request

    def empty(key: str, shape) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=metadata[key].properties.dtype)

    request = {k: empty(k, metadata[k].size) for k in flat}
    loaded = load(request, {k: (0,) * len(metadata[k].size) for k in flat})
    yield {unsharded_name(k, None): v for k, v in loaded.items()}
    num_layers = layers.pop() if layers else 0
    for layer in range(num_layers):
        request = {k: empty(k, (1, *metadata[k].size[1:])) for k in stacked}
        offsets = {k: (layer,) + (0,) * (len(metadata[k].size) - 1) for k in stacked}
        mine = [k for k in keys if own[k] == layer]
        request.update({k: empty(k, metadata[k].size) for k in mine})
        offsets.update({k: (0,) * len(metadata[k].size) for k in mine})
        loaded = load(request, offsets)
        group = {}
        for key, value in loaded.items():
            value = value if own[key] is not None else value[0]  # the layer's tensor
            if EXPERTS_KEY in key:  # [experts, ...]: one tensor per expert
                group.update({unsharded_name(key, layer, expert): tensor
                              for expert, tensor in enumerate(value)})
            else:
                group[unsharded_name(key, layer)] = value
        yield group


def save_dist_from_tensors(tensors: dict[str, torch.Tensor], directory: str,
                           common: Optional[dict] = None) -> None:
    """Write unsharded-name tensors as a ``dist_checkpointing`` directory.

    Keys and layer stacking are exactly those a training run saves, so any
    TP/PP loads the result (tensors may be file views: nothing is copied
    before it is written).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    located = {name: checkpoint_key(name) for name in tensors}
    experts = {name: expert_of(name) for name in tensors}
    num_layers = 1 + max((layer for _, layer in located.values() if layer is not None),
                         default=-1)
    num_experts = 1 + max((expert for _, expert in experts.values() if expert is not None),
                          default=-1)
    state: dict = dict(common or {})
    sharded = {}
    for name, tensor in tensors.items():
        key, layer = located[name]
        expert_key, expert = experts[name]
        if layer is None:
            sharded[name] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
        elif expert is not None:  # stacked over layers, then over experts
            sharded[name] = ShardedTensor.from_rank_offsets(
                expert_key, tensor, (0, layer, num_layers), (1, expert, num_experts),
                replica_id=0, prepend_axis_num=2)
        else:
            sharded[name] = ShardedTensor.from_rank_offsets(
                key, tensor, (0, layer, num_layers), replica_id=0, prepend_axis_num=1)
    state["tensors"] = sharded
    keep_writes_in_process()  # no helper process (see writer.py)
    dist_checkpointing.save(state, directory)


def checkpoint_vocab_rows(path: str) -> Optional[int]:
    """Rows of the word embedding in a checkpoint directory (dist or unsharded)."""
    if is_unsharded(path):
        return UnshardedReader(path).shape("embedding.word_embeddings.weight")[0]
    try:
        metadata = read_dist_metadata(path).state_dict_metadata
    except RefusedFileError:
        raise
    except BaseException:  # noqa: BLE001 - reported by the loader with context
        return None
    entry = metadata.get("embedding.word_embeddings.weight")
    return int(entry.size[0]) if entry is not None else None
