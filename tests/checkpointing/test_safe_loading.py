"""Reading a checkpoint never runs code stored in it: every pickled file the project reads
(legacy rank files, ``common.pt`` of both forms, a dist checkpoint's ``.metadata`` and
pickled objects) goes through the restricted unpickler of ``checkpointing/pickles.py``."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

from megatron_ext.checkpointing import CheckpointError
from megatron_ext.checkpointing.legacy import LegacyObject, load_legacy_file, read_legacy_checkpoint
from megatron_ext.checkpointing.pickles import (
    RefusedFileError,
    check_dist_checkpoint,
    load_pickled,
    read_dist_common,
    read_dist_metadata,
)
from megatron_ext.checkpointing.sources import open_checkpoint
from megatron_ext.checkpointing.unsharded import UnshardedReader, iter_dist_checkpoint
from tests.checkpointing.test_legacy import LLAMA_ARGS, PADDED, llama_state, rank_file

HOW = ["os.system", "builtins.open", "subprocess.call"]


class Payload:
    """Unpickles as a call that creates ``marker`` (if the call runs)."""

    def __init__(self, marker, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "builtins.open":
            return open, (self.marker, "w")
        return subprocess.call, (["touch", self.marker],)


@pytest.fixture(params=HOW)
def payload(request, tmp_path):
    marker = tmp_path / "pwned"
    yield Payload(marker, request.param), marker
    assert not marker.exists(), "loading the file ran the code stored in it"


def test_the_payload_would_run_under_a_plain_load(tmp_path):
    """The test's premise: an unrestricted unpickle of the payload creates the file."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker, "builtins.open")))
    assert marker.exists()


def refused(exc_info, path, payload) -> None:
    message = str(exc_info.value)
    assert isinstance(exc_info.value, RefusedFileError) and str(path) in message
    # the module as pickled: posix for os, io for open, commands (protocol 2's name) ...
    assert f".{payload.how.split('.')[1]}, which" in message, message
    assert "could run code" in message


# ---------------------------------------------------------------- legacy: inert stand-ins
def test_legacy_file_loads_a_payload_as_an_inert_stand_in(tmp_path, payload):
    evil, _ = payload
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(num_layers=2, hook=evil), "iteration": 3,
                "checkpoint_version": 3.0, "model": {"w": torch.ones(2)}}, path)
    loaded = load_legacy_file(str(path))
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].num_layers == 2
    assert isinstance(loaded["args"].hook, LegacyObject)
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_legacy_checkpoint_with_a_payload_in_args_reads(tmp_path, payload):
    from megatron_ext.checkpointing.legacy import write_legacy_checkpoint

    evil, _ = payload
    write_legacy_checkpoint(str(tmp_path), llama_state(), LLAMA_ARGS, 1, 1, 2, PADDED)
    path = rank_file(tmp_path, 2, 0)
    saved = load_pickled(path, stand_in=lambda m, n: pytest.fail(f"{m}.{n} in our own file"))
    saved["args"].data_path = evil
    torch.save(saved, path)
    got = read_legacy_checkpoint(str(tmp_path))
    assert isinstance(got.legacy_args["data_path"], LegacyObject)


def test_legacy_pickle_of_the_old_format_is_restricted_too(tmp_path, payload):
    evil, _ = payload
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(hook=evil), "model": {}}, path,
               _use_new_zipfile_serialization=False)
    assert isinstance(load_legacy_file(str(path))["args"].hook, LegacyObject)


# ---------------------------------------------------------------- unsharded: refused
def test_unsharded_common_with_a_payload_is_refused(tmp_path, payload):
    from megatron_ext.checkpointing.unsharded import UnshardedWriter

    evil, _ = payload
    with UnshardedWriter(str(tmp_path / "ckpt")) as writer:
        writer.add("embedding.word_embeddings.weight", torch.ones(4, 2))
        out = writer.finish({"iteration": 1}, {"model": {}}, common={"hook": evil})
    with pytest.raises(CheckpointError) as exc_info:
        UnshardedReader(out).common()
    refused(exc_info, os.path.join(out, "common.pt"), evil)


# ---------------------------------------------------------------- dist checkpoints
def dist_checkpoint(directory, common=None, objects=None, tensors=None) -> str:
    """A dist_checkpointing-shaped directory: DCP files, common.pt, run_config, tracker."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    iteration = directory / "iter_0000001"
    state = {"embedding.word_embeddings.weight": torch.ones(4, 2)}
    state.update(tensors or {})
    state.update(objects or {})  # pickled as megatron-core stores a ShardedObject's data
    dcp_save(state, storage_writer=FileSystemWriter(str(iteration)), no_dist=True)
    torch.save(common if common is not None else {"common": {"weights_only": True}},
               iteration / "common.pt")
    (iteration / "run_config.json").write_text('{"model": {}}', encoding="utf-8")
    (directory / "latest_checkpointed_iteration.txt").write_text("1", encoding="utf-8")
    return str(iteration)


def test_dist_checkpoint_of_safe_files_is_read(tmp_path):
    rng = {"random": (3, tuple(range(5)), None), "torch": torch.get_rng_state(),
           "numpy": __import__("numpy").random.get_state()}
    directory = dist_checkpoint(tmp_path, objects={"rng_state/shard_0_1": rng})
    assert check_dist_checkpoint(directory, {"rng_state"}) == {"common": {"weights_only": True}}
    assert "embedding.word_embeddings.weight" in read_dist_metadata(directory).state_dict_metadata
    assert open_checkpoint(str(tmp_path)).common() == {"common": {"weights_only": True}}
    (group,) = iter_dist_checkpoint(directory)
    assert torch.equal(group["embedding.word_embeddings.weight"], torch.ones(4, 2))


def test_a_checkpoint_read_a_layer_at_a_time_reads_its_metadata_once(tmp_path, monkeypatch):
    """iter_dist_checkpoint loads each layer with its own DCP load: the ``.metadata`` file
    is read (restricted) once for all of them, and torch never unpickles it itself."""
    from megatron_ext.checkpointing import pickles

    layers = torch.arange(24.0).reshape(3, 2, 4)  # stacked: one DCP load per layer
    directory = dist_checkpoint(tmp_path, tensors={
        "decoder.layers.self_attention.linear_proj.weight": layers})
    reads = []
    restricted = pickles.load_pickled
    monkeypatch.setattr(pickles, "load_pickled", lambda path, *args, **kwargs: (
        reads.append(os.path.basename(path)), restricted(path, *args, **kwargs))[1])

    def unrestricted(*args, **kwargs):
        raise AssertionError("torch unpickled a file itself")

    monkeypatch.setattr(pickle, "load", unrestricted)
    groups = list(iter_dist_checkpoint(directory))
    assert reads == [".metadata"]
    assert torch.equal(groups[0]["embedding.word_embeddings.weight"], torch.ones(4, 2))
    assert len(groups) == 4 and all(
        torch.equal(next(iter(group.values())), layers[index])
        for index, group in enumerate(groups[1:]))


def test_dist_common_with_a_payload_is_refused(tmp_path, payload):
    evil, _ = payload
    directory = dist_checkpoint(tmp_path, common={"common": {"hook": evil}})
    for load in (lambda: read_dist_common(directory),
                 lambda: check_dist_checkpoint(directory),
                 lambda: open_checkpoint(str(tmp_path))):  # sources: the exporters' reader
        with pytest.raises(CheckpointError) as exc_info:
            load()
        refused(exc_info, os.path.join(directory, "common.pt"), evil)


def test_dist_metadata_with_a_payload_is_refused(tmp_path, payload):
    evil, _ = payload
    directory = dist_checkpoint(tmp_path)
    metadata = read_dist_metadata(directory)
    metadata.storage_meta = evil
    with open(os.path.join(directory, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)
    for load in (lambda: check_dist_checkpoint(directory),
                 lambda: list(iter_dist_checkpoint(directory))):
        with pytest.raises(CheckpointError) as exc_info:
            load()
        refused(exc_info, os.path.join(directory, ".metadata"), evil)


def test_dist_object_with_a_payload_is_refused(tmp_path, payload):
    """The pickled objects (RNG state) that torch's load planner would unpickle freely."""
    evil, _ = payload
    directory = dist_checkpoint(tmp_path, objects={"rng_state/shard_0_1": {"state": evil}})
    check_dist_checkpoint(directory)  # not asked for: not read
    with pytest.raises(CheckpointError) as exc_info:
        check_dist_checkpoint(directory, {"rng_state"})
    refused(exc_info, f"{directory}: object rng_state/shard_0_1", evil)


def test_a_damaged_metadata_file_is_a_clear_error(tmp_path):
    directory = dist_checkpoint(tmp_path)
    with open(os.path.join(directory, ".metadata"), "r+b") as handle:
        handle.truncate(20)
    with pytest.raises(CheckpointError, match="cannot be loaded.*damaged"):
        check_dist_checkpoint(directory)


def test_refused_names_are_never_imported(tmp_path):
    """A name outside the allow-list is refused before its module is imported."""
    data = pickle.dumps(Payload(tmp_path / "x", "os.system"), protocol=0).replace(
        b"posix\n", b"nonexistent_module_x\n")
    with pytest.raises(RefusedFileError, match="nonexistent_module_x.system"):
        load_pickled(io.BytesIO(data), torch_file=False, name="probe")
    assert "nonexistent_module_x" not in sys.modules
