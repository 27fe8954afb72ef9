"""The trainer of a run plan's backend: megatron-core's, or the Hugging Face model's."""

from __future__ import annotations

from typing import Optional

from megatron_ext.training.config import TrainConfig
from megatron_ext.training.plan import RunPlan, resolve
from megatron_ext.training.trainer import Trainer


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
