"""Run by test_precision.py in a run_many.py worker: what a mixed-precision trainer holds.

``main(argv)`` builds the trainer of ``argv`` (finetune.py's flags), trains one step and
prints one JSON line: the dtypes of the model's parameters, of the optimizer's main
parameters and their gradients, and of the loss, and the loss scale.
"""

import json

import torch

from megatron_ext.training.arguments import parse_config
from megatron_ext.training.step import loss_func
from megatron_ext.training.trainer import Trainer


def _names(tensors) -> list[str]:
    return sorted({str(t.dtype).replace("torch.", "") for t in tensors})


def main(argv: list[str]) -> None:
    trainer = Trainer(parse_config(argv))
    step = trainer.train_step()
    inner = trainer.optimizer.chained_optimizers[0]
    # megatron-core's fp32 copies of the half-precision weights (the distributed optimizer
    # keeps this rank's shard of them), which Adam updates
    main_params = [p for group in inner.optimizer.param_groups for p in group["params"]]
    main_grads = [p.grad for p in main_params if p.grad is not None]
    model_params = list(trainer.model.module.parameters())
    half = torch.ones(2, 3, dtype=model_params[0].dtype)  # a per-token loss in the model's dtype
    loss, _, report = loss_func(torch.ones(2, 3), 6.0, half)
    print(json.dumps({
        "optimizer": type(inner).__name__,
        "model_params": _names(model_params),
        "main_params": _names(main_params),
        "main_param_numel": sum(p.numel() for p in main_params),
        "model_param_numel": sum(p.numel() for p in model_params),
        "main_grads": _names(main_grads),
        "grad_buffers": _names(b.grad_data for b in trainer.model.buffers),
        "loss": str(loss.dtype).replace("torch.", ""),
        "report": str(report["lm loss"].dtype).replace("torch.", ""),
        "loss_scale": step["loss_scale"],
        "grad_norm": step["grad_norm"],
    }))
