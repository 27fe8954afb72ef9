"""Where a checkpoint's weights are, and how many embedding rows a model loading them needs.

Why shared: the trainer and the inference loader must pad the vocabulary the
same way. Reusing a dist checkpoint's own row count keeps a resume at another
TP exact (padded logits take part in the softmax); an unsharded or legacy
checkpoint's rows are adapted to any padding by its loader.
"""

from __future__ import annotations

from typing import Optional

from megatron_ext.checkpointing.forms import checkpoint_directory, is_legacy, is_unsharded
from megatron_ext.checkpointing.unsharded import checkpoint_vocab_rows
from megatron_ext.errors import CheckpointError
from megatron_ext.models.config import padded_vocab_size


def padded_vocab_for(load: Optional[str], vocab_size: int, divisible_by: int, tp: int) -> int:
    """Embedding rows for a model of ``vocab_size`` tokens at ``tp`` that loads ``load``."""
    default = padded_vocab_size(vocab_size, divisible_by, tp)
    directory = checkpoint_directory(load) if load else None
    if directory is None or is_legacy(load):
        return default
    rows = checkpoint_vocab_rows(directory)
    if rows is None:
        return default
    if rows < vocab_size:
        raise CheckpointError(
            f"{load} has {rows} embedding rows but the tokenizer has {vocab_size} tokens: the "
            "tokenizer (or --vocab_extra_ids_list) differs from the one the checkpoint was "
            "made with")
    if is_unsharded(load):
        return default  # its rows are adapted to any padding
    if rows % tp:
        raise CheckpointError(
            f"{load} has {rows} vocabulary rows, which TP {tp} cannot split; reshard it first: "
            f"python tools/checkpoint_util.py split --load {load} --out NEW_DIR --target_tp {tp}")
    return rows
