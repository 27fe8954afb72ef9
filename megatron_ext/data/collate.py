"""Batches for causal-LM finetuning: padding, optional packing, loss weights.

Why this shape: a batch row holds one sample, or several packed back to back;
``segment_ids`` (1, 2, ... per sample, 0 on padding) and ``position_ids``
(restarting at 0 for every sample) describe both cases, and the attention
mask built from ``segment_ids`` keeps packed samples apart, and the model's
RoPE follows ``position_ids`` (``models.builder``), so a packed sample sees
exactly the numbers it would see alone in a row. The loss
weight of a position is the weight of the role of the token it predicts:
assistant 1, user and system ``scalar_loss_mask``, padding 0. The trainer
divides the weighted token losses by the *global* batch's total weight.

Context parallelism (CP ranks share one sequence): :func:`zigzag_indices` says
which positions of a row a CP rank keeps (chunks ``r`` and ``2CP-1-r`` of
``2CP``: under a causal mask every rank then has the same attention work), and
:meth:`Batch.context_parallel_shard` takes them from every field, so RoPE
(``position_ids``) and the loss weights stay those of the global positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_ext.data.records import ROLE_IDS

Sample = tuple[np.ndarray, np.ndarray]  # (tokens, roles) of one record


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64 model inputs
    labels: torch.Tensor  # [b, s] int64 next tokens (pad_id on padding)
    loss_weights: torch.Tensor  # [b, s] float32, 0 on padding
    position_ids: torch.Tensor  # [b, s] int64, restart at 0 in every sample
    segment_ids: torch.Tensor  # [b, s] int32, 1..k per sample in the row, 0 on padding

    @property
    def real_tokens(self) -> int:
        """Non-padding positions."""
        return int((self.segment_ids > 0).sum())

    @property
    def total_weight(self) -> float:
        return float(self.loss_weights.sum())

    def context_parallel_shard(self, cp_size: int, cp_rank: int) -> "Batch":
        """The positions CP rank ``cp_rank`` of ``cp_size`` keeps (:func:`zigzag_indices`),
        from every field; the row width must be a multiple of ``2 * cp_size``."""
        if cp_size == 1:
            return self
        keep = zigzag_indices(self.tokens.shape[1], cp_size, cp_rank)
        return Batch(*(field.index_select(1, keep) for field in (
            self.tokens, self.labels, self.loss_weights, self.position_ids, self.segment_ids)))


def zigzag_indices(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a row of ``length`` that CP rank ``cp_rank`` keeps, in order.

    The row is cut into ``2 * cp_size`` equal chunks and rank ``r`` keeps chunks ``r``
    and ``2 * cp_size - 1 - r``: under a causal mask an early chunk attends to few keys
    and a late one to many, so each rank gets one of each and the same work.
    """
    chunks = 2 * cp_size
    if length % chunks:
        raise ValueError(f"a row of {length} positions does not split into {chunks} chunks "
                         f"(context parallel size {cp_size})")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context parallel rank {cp_rank} is not in 0..{cp_size - 1}")
    size = length // chunks
    first, second = cp_rank * size, (chunks - 1 - cp_rank) * size
    return torch.cat([torch.arange(first, first + size), torch.arange(second, second + size)])


def gathered_positions(length: int, cp_size: int) -> torch.Tensor:
    """Global positions of the keys/values after an all-gather over the CP ranks: each
    rank's :func:`zigzag_indices` in rank order (``[length]``; a permutation)."""
    return torch.cat([zigzag_indices(length, cp_size, rank) for rank in range(cp_size)])


def role_weights(scalar_loss_mask: float) -> np.ndarray:
    """Weight per role id: assistant 1, user/system ``scalar_loss_mask``."""
    weights = np.full(len(ROLE_IDS), scalar_loss_mask, dtype=np.float32)
    weights[ROLE_IDS["assistant"]] = 1.0
    return weights


def padded_width(longest: int, seq_length: int, variable_seq_lengths: bool,
                 multiple: int = 16) -> int:
    """Row width: ``seq_length``, or the longest row rounded up to ``multiple``."""
    if not variable_seq_lengths:
        return seq_length
    return min(seq_length, -(-max(longest, 1) // multiple) * multiple)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indexes of ``lengths`` grouped into rows of total length <= ``capacity``.

    First-fit decreasing (longest first, ties in order), deterministic, so
    every rank packs a micro-batch identically; rows keep their samples in
    input order and come out ordered by their first sample.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = min(lengths[index], capacity)
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(index)
                room[row] -= size
                break
        else:
            rows.append([index])
            room.append(capacity - size)
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def collate(rows: Sequence[Sequence[Sample]], seq_length: int, pad_id: int,
            scalar_loss_mask: float = 0.0, variable_seq_lengths: bool = False,
            multiple: int = 16) -> Batch:
    """Build a batch from rows of samples (one sample per row unless packed).

    A sample of n tokens gives n - 1 (input, label) positions; a row keeps at
    most ``seq_length`` positions, later samples of a packed row first.
    """
    weights_of_role = role_weights(scalar_loss_mask)
    pieces = []
    for row in rows:
        inputs, labels, weights, positions, segments = [], [], [], [], []
        used = 0
        for number, (tokens, roles) in enumerate(row, start=1):
            if used >= seq_length:
                break
            take = min(len(tokens) - 1, seq_length - used)
            if take <= 0:  # a one-token sample predicts nothing; later ones still count
                continue
            inputs.append(tokens[:take])
            labels.append(tokens[1:take + 1])
            weights.append(weights_of_role[roles[1:take + 1]])
            positions.append(np.arange(take))
            segments.append(np.full(take, number, dtype=np.int32))
            used += take
        pieces.append([np.concatenate(p) if p else np.zeros(0) for p in
                       (inputs, labels, weights, positions, segments)])
    width = padded_width(max((len(p[0]) for p in pieces), default=1), seq_length,
                         variable_seq_lengths, multiple)
    out = {
        "tokens": np.full((len(rows), width), pad_id, dtype=np.int64),
        "labels": np.full((len(rows), width), pad_id, dtype=np.int64),
        "loss_weights": np.zeros((len(rows), width), dtype=np.float32),
        "position_ids": np.tile(np.arange(width, dtype=np.int64), (len(rows), 1)),
        "segment_ids": np.zeros((len(rows), width), dtype=np.int32),
    }
    for index, (inputs, labels, weights, positions, segments) in enumerate(pieces):
        n = len(inputs)
        out["tokens"][index, :n] = inputs
        out["labels"][index, :n] = labels
        out["loss_weights"][index, :n] = weights
        out["position_ids"][index, :n] = positions
        out["segment_ids"][index, :n] = segments
    return Batch(**{key: torch.from_numpy(value) for key, value in out.items()})
