"""Mixture-of-experts layers on megatron-core's ``MoELayer``: the block spec's MLP when a
model has ``--num_experts``, with two changes of ours.

Why these two:

* :class:`SeededSequentialMLP`: megatron-core's local experts draw their initial weights
  one after the other from the generator, so at EP=2 rank 1's experts 4..7 get the weights
  rank 0's experts 0..3 get (and EP=1's experts 0..3 have). Each expert here reseeds from
  a number drawn once per layer plus its *global* index: expert ``e`` starts from the same
  weights at every EP, as each layer does at every PP (``builder.layer_spec``); the
  generator then continues from that draw, so what is built after the layer (the output
  layer) does not depend on which experts a rank holds.
  The experts' weights are expert-parallel weights (``allreduce = False``) at EP=1 too,
  where megatron-core would hand them to the dense optimizer: the optimizer is then a
  chain of the dense and the experts' at every EP, so a checkpoint's optimizer state
  (keyed ``chained_0.``/``chained_1.``) loads at another EP.
* :class:`ScaledAuxLossRouter`: megatron-core scales the load-balancing and z-loss
  gradients for its own per-token loss (times the micro-batch's tokens, later divided by
  the global batch's). Our loss (``training/step.py``) is already the global batch's mean
  and tells megatron-core to divide by nothing, so the router here attaches
  ``coeff x aux / M`` per micro-batch instead (``M``: the global batch's micro-batches
  over every data-parallel rank, set by the trainer each step): the gradient of the mean
  over micro-batches of ``coeff x sum over layers of aux``, at every layout.

Importing this module costs no megatron-core; its classes are made on first use.
"""

from __future__ import annotations

import functools

import torch

AUX_LOSSES = ("load_balancing_loss", "z_loss")  # megatron-core's tracker names


def expert_seed(base: int, expert: int) -> int:
    """The seed of global expert ``expert`` of a layer whose draw was ``base``."""
    return (base * 1_000_003 + expert) % (2 ** 63)


@functools.cache
def moe_classes():
    """(SeededSequentialMLP, ScaledAuxLossRouter), built on first use (megatron-core)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        save_to_aux_losses_tracker,
    )
    from megatron.core.transformer.moe.router import TopKRouter

    class SeededSequentialMLP(SequentialMLP):
        """megatron-core's ``SequentialMLP`` whose expert ``e`` (global index) is drawn from
        :func:`expert_seed` of one number the layer's generator gives."""

        def __init__(self, num_local_experts, config, submodules, pg_collection=None):
            super().__init__(0, config, submodules, pg_collection)  # the groups, no experts
            self.num_local_experts = num_local_experts
            base = int(torch.randint(0, 2 ** 62, (1,)).item())  # the layer's, at every EP
            first = parallel_state.get_expert_model_parallel_rank() * num_local_experts
            after = torch.get_rng_state()  # what follows (the output layer) draws from here
            for local in range(num_local_experts):
                torch.manual_seed(expert_seed(base, first + local))
                self.local_experts.append(MLP(
                    self.config, submodules, ffn_hidden_size=self.config.moe_ffn_hidden_size,
                    is_expert=True, tp_group=pg_collection.expt_tp))
            torch.set_rng_state(after)
            for parameter in self.parameters():  # expert weights at every EP, EP=1 included
                parameter.allreduce = False

    class ScaledAuxLossRouter(TopKRouter):
        """``TopKRouter`` whose auxiliary losses' gradients are ``coeff x loss x scale``
        (``scale`` = 1 / the global batch's micro-batches: :func:`set_aux_loss_scale`);
        megatron-core's tracker still records each loss unweighted."""

        scale = 1.0  # class-wide: set by the trainer before each step

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calculate_per_token_loss = False  # our loss is normalised already

        def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
            return super().get_aux_loss_coeff(aux_loss_type) * ScaledAuxLossRouter.scale

        def apply_z_loss(self, logits, padding_mask=None):
            coeff = self.config.moe_z_loss_coeff
            if coeff is None or not (self.training and torch.is_grad_enabled()):
                return logits
            coeff = coeff * ScaledAuxLossRouter.scale
            # the mean over the micro-batch's tokens (padding left out) of the squared
            # log-sum-exp, each tensor- and context-parallel rank adding its tokens' share
            valid = (torch.ones(logits.shape[0], device=logits.device) if padding_mask is None
                     else (~padding_mask.reshape(-1)).to(torch.float32))
            count = valid.sum().detach()
            if self.tp_cp_group.size() > 1:
                torch.distributed.all_reduce(count, group=self.tp_cp_group)
            squares = torch.logsumexp(logits.float(), dim=-1).square()
            z_loss = coeff * (squares * valid).sum() / count.clamp(min=1.0)
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
            save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number,
                                       self.config.num_layers)
            return logits

    return SeededSequentialMLP, ScaledAuxLossRouter


def set_aux_loss_scale(micro_batches: int) -> None:
    """The auxiliary losses' gradients of the next step: each micro-batch's counts
    ``1 / micro_batches`` (all of the global batch's, over the data-parallel ranks); the
    losses megatron-core tracks start from nothing (its tracker is a process-wide dict
    sized by the first model's layers: a later model in the same process gets its own)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    moe_classes()[1].scale = 1.0 / max(1, micro_batches)
    get_moe_layer_wise_logging_tracker().clear()


def moe_mlp_spec():
    """megatron-core's local MoE module spec with our experts and router."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    import dataclasses

    experts_cls, router_cls = moe_classes()
    spec = get_moe_module_spec(use_te=False, num_experts=1, moe_grouped_gemm=False)
    experts = ModuleSpec(module=experts_cls, submodules=spec.submodules.experts.submodules)
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, experts=experts, router=router_cls))


def aux_losses(config, dp_group=None, pp_group=None, tp_group=None) -> dict[str, float]:
    """The auxiliary losses of the step that just ran, then cleared: for each, the mean
    over the global batch's micro-batches of ``coeff x`` its sum over the layers (what it
    added to the objective), as ``{name: value}``. Every rank of ``dp_group`` (the data-
    and context-parallel ranks), ``pp_group`` (the stages) and ``tp_group`` gets the same
    numbers: each rank's are its share (training with TP needs sequence parallelism, so
    each tensor- and context-parallel rank routes its share of the tokens)."""
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    coeffs = {"load_balancing_loss": config.moe_aux_loss_coeff or 0.0,
              "z_loss": config.moe_z_loss_coeff or 0.0}
    scale = moe_classes()[1].scale
    found = {}
    for name in AUX_LOSSES:
        total = torch.zeros(1, dtype=torch.float64)
        if name in tracker:
            total += tracker[name]["values"].sum().to(torch.float64).cpu()
        for group in (dp_group, pp_group, tp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(total, group=group)
        # each micro-batch's value was recorded once per data-parallel rank that ran it
        found[name] = float(total[0]) * coeffs[name] * scale
    tracker.clear()
    return {name: value for name, value in found.items() if coeffs[name]}
