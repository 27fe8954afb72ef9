"""One micro-batch through the model: attention mask (models/masks.py), forward, weighted loss.

Why the loss looks like this: megatron-core's schedules either average
micro-batch losses (over-weighting short samples) or normalise by an integer
token count. We want the exact weighted mean over the *global* batch with
fractional weights (``--scalar_loss_mask``), so every rank is told the global
batch's total weight ``W`` up front, each micro-batch contributes
``sum(w * ce) / W``, and megatron-core is asked (``calculate_per_token_loss``)
to neither divide by the number of micro-batches nor average across data
parallel ranks: the gradients then sum to exactly ``d/dθ sum(w * ce) / W``.

Context parallelism changes nothing in that sum: each CP rank builds the whole
micro-batch (a pure function of the data position, like every rank), keeps its
positions (``Batch.context_parallel_shard``) and builds its rows of the mask
from the whole row's segment ids; its ``sum(w * ce)`` covers its positions
only, and megatron-core sums the gradients over the data- x context-parallel
ranks, as the trainer sums the reports.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from megatron_ext.data.collate import Batch
from megatron_ext.models.masks import attention_mask


def loss_func(loss_weights: torch.Tensor, total_weight: float, output: torch.Tensor):
    """``(sum(w * ce) / W, 0, report)`` for megatron-core's per-token-loss path.

    The returned token count is 0 so ``finalize_model_grads`` applies no extra
    scaling; the report carries the un-normalised sum for exact logging.
    """
    weighted = (output.float() * loss_weights).sum()
    scale = 1.0 / total_weight if total_weight > 0 else 0.0
    report = torch.stack([weighted.detach(), loss_weights.sum().detach()])
    return weighted * scale, torch.tensor(0, dtype=torch.int), {"lm loss": report}


def make_forward_step(total_weight: float, window: Optional[int], device: torch.device,
                      cp_size: int = 1, cp_rank: int = 0, moe: bool = False):
    """A megatron-core ``forward_step_func`` closed over the global batch weight; under
    context parallelism (``cp_size > 1``) it runs CP rank ``cp_rank``'s share of each row.
    ``moe``: the model has experts, whose routing statistics (the load-balancing loss) then
    leave the padding out, so they do not depend on how wide a layout's rows are."""

    def forward_step(data_iterator, model):
        batch: Batch = next(data_iterator)
        mask = attention_mask(batch.segment_ids.to(device, non_blocking=True), window,
                              cp_size, cp_rank)
        batch = batch.context_parallel_shard(cp_size, cp_rank)
        tokens = batch.tokens.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        position_ids = batch.position_ids.to(device, non_blocking=True)
        weights = batch.loss_weights.to(device, non_blocking=True)
        extra = {"padding_mask": (batch.segment_ids == 0).to(device)} if moe else {}
        output = model(tokens, position_ids, mask, labels=labels, **extra)
        return output, partial(loss_func, weights, total_weight)

    return forward_step
