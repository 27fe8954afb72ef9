"""Attention masks for padded and packed batches, beside the attention that reads them.

Why here: training and inference must mask exactly alike (a generated token
sees what it saw in training), so both import the one mask from the models
floor; :class:`~megatron_ext.models.attention.PortableAttention` documents how
it consumes it.
"""

from __future__ import annotations

from typing import Optional

import torch


def attention_mask(segment_ids: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True where attention is *forbidden* (megatron-core's convention).

    A query attends to earlier-or-same positions of its own sample (so packed
    samples never see each other), within ``window`` tokens when set. Padding
    positions attend only to themselves, which keeps every softmax row finite.
    """
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    if window is not None:
        distance = torch.arange(s, device=segment_ids.device)
        allowed &= (distance[:, None] - distance[None, :]) < window
    allowed |= torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    return (~allowed)[:, None]
