"""Attention masks for padded and packed batches, beside the attention that reads them.

Why here: training and inference must mask exactly alike (a generated token
sees what it saw in training), so both import the one mask from the models
floor; :class:`~megatron_ext.models.attention.PortableAttention` documents how
it consumes it.

Under context parallelism a CP rank holds the queries of its own positions
(:func:`~megatron_ext.data.collate.zigzag_indices`) and attends to the keys
of all ranks, gathered in rank order
(:func:`~megatron_ext.data.collate.gathered_positions`); its mask is the
serial mask's rows at its query positions, with the columns in that gathered
order, built directly from the global positions and the whole row's segment
ids (``[b, 1, s / CP, s]``: no rank ever holds the ``s x s`` mask).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.data.collate import gathered_positions, zigzag_indices


def attention_mask(segment_ids: torch.Tensor, window: Optional[int] = None,
                   cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True where attention is *forbidden* (megatron-core's convention).

    A query attends to earlier-or-same positions of its own sample (so packed
    samples never see each other), within ``window`` tokens when set. Padding
    positions attend only to themselves, which keeps every softmax row finite.

    ``cp_size > 1``: the mask of CP rank ``cp_rank`` for the whole row's
    ``segment_ids`` (``[b, s]``): ``[b, 1, s / cp_size, s]``, queries at the rank's
    positions, keys in the gathered order (see the module docstring).
    """
    s, device = segment_ids.shape[1], segment_ids.device
    if cp_size == 1:
        query = key = torch.arange(s, device=device)
        query_segments = key_segments = segment_ids
    else:
        query = zigzag_indices(s, cp_size, cp_rank).to(device)
        key = gathered_positions(s, cp_size).to(device)
        query_segments, key_segments = segment_ids[:, query], segment_ids[:, key]
    query, key = query[:, None], key[None, :]  # global positions; bool [sq, sk] below
    allowed = ((query_segments[:, :, None] == key_segments[:, None, :]) & (key <= query)
               & (query_segments[:, :, None] > 0))
    if window is not None:
        allowed &= query < key + window
    allowed |= key == query
    return (~allowed)[:, None]
