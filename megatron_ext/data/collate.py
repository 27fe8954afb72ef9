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
