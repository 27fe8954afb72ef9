"""The training loop of the Hugging Face backend: the same loop, data, loss and logs as
the megatron backend (:class:`~megatron_ext.training.trainer.Trainer`), another model.

What differs is only what the model is: transformers' ``AutoModelForCausalLM`` sharded
with FSDP2 (``hf_native/model.py``), torch's AdamW (megatron-core's own choice without
Apex or Transformer Engine) with megatron-core's parameter groups (no weight decay on
biases and 1-D weights) and learning-rate schedule, and ``torch.distributed.checkpoint``
checkpoints (``checkpointing/dcp.py``). The batches are :class:`BatchBuilder`'s and the
loss is ``step.loss_func``'s exact global-batch mean: sum of ``w * ce`` over the
micro-batches and data-parallel ranks divided by the global batch's weight ``W``, so
FSDP2 is told to sum the gradients, not to average them.

Packed rows: no attention mask is passed and no cache is made (``use_cache=False``), so
transformers isolates the documents of a row by its restarting ``position_ids`` (an
all-ones mask, or a cache, would make them attend to each other without a word).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

from megatron_ext.checkpointing import Progress
from megatron_ext.checkpointing.dcp import hf_backend_checkpoint, load_dcp, save_dcp
from megatron_ext.training.data import GlobalBatch
from megatron_ext.training.step import loss_func
from megatron_ext.training.trainer import Trainer

logger = logging.getLogger(__name__)


class HFModel:
    """The sharded transformers model, with what the loop asks of megatron-core's DDP."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def zero_grad_buffer(self) -> None:
        """(megatron-core's gradient buffer: the optimizer's zero_grad clears ours)"""

    def parameters(self):
        return self.module.parameters()

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class HFOptimizer:
    """torch's AdamW with megatron-core's parameter groups (``wd_mult`` 0 for biases and
    1-D weights, which its schedule reads) and its step: clip the global gradient norm,
    then update; ``step()`` returns (updated, grad norm, None) as megatron-core's does."""

    def __init__(self, module: torch.nn.Module, optim):
        decay, plain = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (plain if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
        groups = [{"params": params, "wd_mult": mult}
                  for params, mult in ((decay, 1.0), (plain, 0.0)) if params]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr,
                                           betas=(optim.adam_beta1, optim.adam_beta2),
                                           eps=optim.adam_eps, weight_decay=optim.weight_decay)
        self.params = decay + plain
        self.clip = optim.clip_grad

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> tuple[bool, float, None]:
        norm = self._clip_grad_norm()
        self.optimizer.step()
        return True, norm, None

    def _clip_grad_norm(self) -> float:
        """torch's ``clip_grad_norm_`` where the gradients are all DTensors of one mesh
        (FSDP2) or all plain; under a tensor-parallel plan, which leaves some parameters
        plain (or on the data-parallel mesh only) beside the others, each one's norm is
        made whole, then all are clipped alike."""
        grads = [p.grad for p in self.params if p.grad is not None]
        kinds = {getattr(g, "device_mesh", None) for g in grads}  # one mesh, or none
        limit = self.clip if self.clip > 0 else math.inf
        if len(kinds) < 2:
            norm = torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=True)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        squares = []
        for grad in grads:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            squares.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2)
        total = float(torch.stack(squares).sum().sqrt())
        coefficient = limit / (total + 1e-6)
        if coefficient < 1.0:
            for grad in grads:
                grad.mul_(coefficient)
        return total

    def get_loss_scale(self) -> float:
        return 1.0


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s] cross entropy of each position's next token, in fp32 (as megatron-core's
    output layer gives them with ``labels``)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                           reduction="none").view_as(labels)


class _PeftReport:
    def __init__(self, targets: list[str], trainable: int):
        self.targets, self.trainable = targets, trainable

    def line(self) -> str:
        return (f"peft adapters on {', '.join(self.targets)}; {self.trainable} trainable "
                "parameters")


class HFTrainer(Trainer):
    """:class:`Trainer` with the Hugging Face model of a ``backend == "hf"`` plan."""

    def _vocab_rows(self) -> int:
        return self.tokenizer.vocab_size  # at least: the model may have more rows

    def _build_model_and_optimizer(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from megatron_ext.hf_native import model as hf

        c, plan, layout = self.config, self.plan, self.layout
        dtype = torch.float32  # parameters; --bf16 computes in bf16 (FSDP2's policy)
        attention = None
        if (c.precision.use_flash_attn and layout.device.type == "cuda"
                and importlib.util.find_spec("flash_attn") is not None):
            attention = "flash_attention_2"  # its varlen path isolates packed documents
        empty = plan.resumed_from is not None and plan.peft is None and layout.tp == 1
        if not empty:
            module = hf.load_model(plan.hf_model, dtype, c.backend.trust_remote_code,
                                   self.tokenizer.vocab_size, attention, tp=layout.tp,
                                   dp=layout.dp, bf16=c.precision.bf16)
        else:  # the checkpoint brings the weights: nothing read twice
            module = hf.build_empty_model(plan.hf_config, dtype, c.backend.trust_remote_code,
                                          self.tokenizer.vocab_size, attention)
        module.config.use_cache = False
        self.peft_report = self.adapted = None
        if plan.peft is not None:  # fresh adapters (a resume overwrites them), base frozen
            module, self.adapted = hf.add_adapters(module, c.peft, c.schedule.seed)
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            self.peft_report = _PeftReport(self.adapted, trainable)
        mesh = (init_device_mesh(layout.device.type, (layout.dp, layout.tp),
                                 mesh_dim_names=("dp", "tp")) if layout.tp == 1 else None)
        module = hf.parallelize(module, mesh,
                                recompute=c.precision.recompute_granularity == "full",
                                compile=c.backend.compile_backend if c.backend.compile
                                else None, bf16=c.precision.bf16)
        if empty:
            hf.materialize(module, layout.device)
        elif layout.device.type != "cpu":
            module.to(layout.device)
        self.padded_vocab = module.get_input_embeddings().weight.shape[0]
        self.model = HFModel(module)
        self.optimizer = HFOptimizer(module, c.optim)
        self.scheduler = self._scheduler()

    def _model_line(self) -> str:
        from megatron_ext.hf_native.model import decoder_layers

        c, module = self.config, self.model.module
        params = sum(p.numel() for p in module.parameters())
        layers = [f"{len(decoder_layers(module))} decoder layers"]
        if c.precision.recompute_granularity == "full":
            layers.append("recomputed")
        if c.backend.compile:
            layers.append(f"compiled ({c.backend.compile_backend})")
        return ("model %s (Hugging Face backend, %s): %s; vocab %d (%d rows); %.2fM "
                "parameters (FSDP2 over %d data-parallel ranks)" % (
                    module.config.model_type, type(module).__name__, ", ".join(layers),
                    self.tokenizer.vocab_size, self.padded_vocab, params / 1e6,
                    self.layout.dp))

    def _run(self, gb: GlobalBatch, forward_only: bool):
        device = self.layout.device
        reports = []
        for batch in gb.micro_batches:
            output = self.model.module(input_ids=batch.tokens.to(device),
                                       position_ids=batch.position_ids.to(device),
                                       use_cache=False)
            losses = token_losses(output.logits, batch.labels.to(device))
            loss, _, report = loss_func(batch.loss_weights.to(device), gb.total_weight, losses)
            if not forward_only:
                loss.backward()
            reports.append(report)
        return reports

    def _state_options(self):
        """What a checkpoint holds: everything, or the adapters only (``--peft``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        adapters = self.plan.peft is not None
        return StateDictOptions(ignore_frozen_params=adapters, strict=not adapters)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model.module, self.optimizer.optimizer,
                                      options=self._state_options())
        return {"model": model, "optim": optim}

    def _load(self) -> None:
        """A resume: weights, optimizer state, schedule and progress from the checkpoint
        (a fresh run's weights came with the model)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        if self.plan.resumed_from is None:
            if self.plan.peft is None and hf_backend_checkpoint(self.plan.load):
                # --finetune from a checkpoint of this backend: its weights, nothing else
                module = self.model.module
                state = {"model": get_model_state_dict(module)}
                directory, _, _ = load_dcp(self.plan.load, state)
                set_model_state_dict(module, state["model"])
                if self.layout.is_logger:
                    logger.info("loaded weights from %s", directory)
            return
        state = self._state()
        directory, progress, common = load_dcp(self.plan.resumed_from, state)
        set_state_dict(self.model.module, self.optimizer.optimizer,
                       model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._state_options())
        self.scheduler.load_state_dict(common["scheduler"])
        self._restore_progress(progress)
        if self.layout.is_logger:
            logger.info("loaded checkpoint %s (iteration %d); resuming", directory,
                        progress.iteration)

    def save(self) -> str:
        import time

        start = time.perf_counter()
        progress = Progress(self.iteration, self.consumed_samples, self.consumed_tokens)
        module = self.model.module
        run_config = {**self.config.to_dict(), "tokenizer_identity": self.tokenizer.identity(),
                      "chat": self._chat_settings(),
                      "hf_model": {"path": os.path.abspath(self.plan.hf_model),
                                   "class": type(module).__name__,
                                   "config": module.config.to_dict()}}
        if self.plan.peft is not None:  # adapters only: the base they belong to
            run_config["peft"] = self.config.peft.settings(tuple(self.adapted))
            run_config["base"] = self.plan.peft.record
        path = save_dcp(self.config.checkpoint.save, self._state(), progress,
                        {"scheduler": self.scheduler.state_dict(),
                         "layout": {"dp": self.layout.dp, "tp": self.layout.tp}},
                        run_config, self.layout.rank)
        self._saved_at = self.iteration
        if self.layout.is_logger:
            logger.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - start)
        return path
