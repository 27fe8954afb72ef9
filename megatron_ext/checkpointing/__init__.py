"""Checkpoints in three forms, loaded at any TP/PP; this face only re-exports.

Rooms (each imports the others directly, never through this face):

* ``tracker``: ``latest_checkpointed_iteration.txt`` and the ``iter_*`` names;
* ``run_config``: ``run_config.json`` read and written, the tokenizer it names;
* ``state``: what a checkpoint restores into (``TrainState``, ``Progress``) and
  the model-shape check every loader makes;
* ``dist``: ``dist_checkpointing`` run directories, saved and loaded (the loader
  also takes the other two forms);
* ``unsharded``: the unsharded safetensors file set;
* ``legacy``: Megatron-LLM's per-rank layout (a package split by job);
* ``sources``: any checkpoint as unsharded tensors, a layer at a time;
* ``hf_import``, ``hf_export``, ``hf_tokenizer``: Hugging Face models and
  tokenizers in and out; ``reshard``: merge and split; ``vocab``: embedding rows.
"""

from megatron_ext.checkpointing.dist import load_checkpoint, save_checkpoint
from megatron_ext.checkpointing.run_config import RUN_CONFIG, load_run_config
from megatron_ext.checkpointing.sources import read_run_config
from megatron_ext.checkpointing.state import (
    OPTIMIZER_METADATA,
    Progress,
    TrainState,
    check_model_matches,
)
from megatron_ext.checkpointing.tracker import (
    TRACKER,
    iteration_dir,
    latest_iteration,
    write_tracker,
)
from megatron_ext.errors import CheckpointError

__all__ = [
    "OPTIMIZER_METADATA", "RUN_CONFIG", "TRACKER", "CheckpointError", "Progress", "TrainState",
    "check_model_matches", "iteration_dir", "latest_iteration", "load_checkpoint",
    "load_run_config", "read_run_config", "save_checkpoint", "write_tracker",
]
