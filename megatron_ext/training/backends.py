"""The trainer of a run plan's backend: megatron-core's, or the Hugging Face model's."""

from __future__ import annotations

import importlib
from typing import Optional

from megatron_ext.training.config import TrainConfig
from megatron_ext.training.plan import RunPlan, resolve
from megatron_ext.training.trainer import Trainer


TRAINER_MODULES = {
    "megatron": ("megatron_ext.models.builder", "megatron_ext.checkpointing.dist",
                 "megatron.core.models.gpt", "megatron.core.distributed",
                 "megatron.core.optimizer", "megatron.core.pipeline_parallel",
                 "megatron.core.dist_checkpointing"),
    "hf": ("megatron_ext.training.hf_trainer", "megatron_ext.checkpointing.dcp",
           "transformers.modeling_utils"),
}
"""What each backend's trainer imports as it builds and trains (most of it lazily, so that
a process imports only its backend's): an entry point imports them up front inside
``startup.heavy_imports`` (megatron_ext/startup.py), where importing is cheaper."""


def import_trainer(plan: RunPlan) -> None:
    """Import what the trainer of ``plan``'s backend uses."""
    for module in TRAINER_MODULES[plan.backend]:
        importlib.import_module(module)


def make_trainer(plan: "RunPlan | TrainConfig", cuda: Optional[bool] = None) -> Trainer:
    """The trainer of ``plan`` (a configuration is resolved first)."""
    if isinstance(plan, TrainConfig):
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        plan = resolve(plan, cuda=cuda)
    if plan.backend == "hf":
        from megatron_ext.training.hf_trainer import HFTrainer

        return HFTrainer(plan)
    return Trainer(plan)
