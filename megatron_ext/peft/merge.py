"""Fold adapters into base weights on unsharded tensors (one layer at a time).

Why apart from :mod:`megatron_ext.peft.adapters`: export and ``merge_lora`` stream
checkpoints layer by layer without building a model; the arithmetic is the one
of ``merge_into_base`` on whole tensors (and of Hugging Face ``peft``'s
``merge_and_unload``): ``W' = W + s B A``, and for DoRA
``W' = m / |W + s B A|_row * (W + s B A)``, in fp32, cast back to W's dtype.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_ext.peft.config import ADAPTER, NORM_EPS

SUFFIXES = ("lora_A", "lora_B", "magnitude")


def adapted_prefixes(adapter_tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """``decoder.layers.3.mlp.linear_fc1`` for each adapter in ``adapter_tensors``
    (unsharded names such as ``decoder.layers.3.mlp.linear_fc1.adapter.lora_A``)."""
    marker = f".{ADAPTER}.lora_A"
    return sorted(name[:-len(marker)] for name in adapter_tensors if name.endswith(marker))


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float, magnitude: torch.Tensor | None = None,
                  norms: torch.Tensor | None = None) -> torch.Tensor:
    """``W + s B A`` (DoRA: rescaled to ``magnitude`` per row); ``norms``: the rows' norms
    when ``weight`` holds only part of each row (a row-parallel shard), else computed."""
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        if norms is None:
            norms = merged.square().sum(dim=1).sqrt().clamp_min(NORM_EPS)
        merged = merged * (magnitude.float() / norms)[:, None]
    return merged.to(weight.dtype)


def merge_group(base: Mapping[str, torch.Tensor], adapter_tensors: Mapping[str, torch.Tensor],
                scaling: float) -> dict[str, torch.Tensor]:
    """``base`` (a group of unsharded tensors: the embeddings, or one layer) with the
    adapters of ``adapter_tensors`` that belong to it folded into their weights."""
    out = dict(base)
    for prefix in adapted_prefixes(adapter_tensors):
        name = f"{prefix}.weight"
        if name not in base:
            continue  # another group's adapter
        get = adapter_tensors.get
        out[name] = merged_weight(base[name], get(f"{prefix}.{ADAPTER}.lora_A"),
                                  get(f"{prefix}.{ADAPTER}.lora_B"), scaling,
                                  get(f"{prefix}.{ADAPTER}.magnitude"))
    return out
