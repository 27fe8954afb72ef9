"""LoRA and DoRA adapters on megatron-core's tensor-parallel linear layers (no Transformer Engine).

Why written here: megatron-core 0.16 has no adapters for its local (non-TE)
layers, and the usual ways of adding them break under tensor parallelism in
quiet ways (a replicated factor whose gradient is never summed, an
initialisation drawn per shard). An adapter here is a child ``adapter`` of the
linear layer it adapts; the layer's class becomes a subclass that adds the
adapter's output to its own (the mechanism of ``torch.nn.utils.parametrize``),
so the base weights keep their names and every checkpoint form loads them as
before.

Sharding, for ``y = W x + s B A x`` with ``s = alpha / r``:

* column-parallel base (``linear_qkv``, ``linear_fc1``; W split by output rows):
  A ``[r/tp, in]`` is split along the rank and its output all-gathered (whose
  backward reduce-scatters the partial gradients), B ``[out/tp, r]`` is split like
  W's rows. Under sequence parallelism the input is gathered along the sequence.
* row-parallel base (``linear_proj``, ``linear_fc2``; W split by input columns):
  A ``[r, in/tp]`` is split along the input and its output summed (all-reduce, or
  reduce-scatter along the sequence under sequence parallelism); B ``[out, r]`` is
  whole on every rank. Under sequence parallelism each rank sees a part of the
  sequence, so B's (and DoRA's magnitude's) gradients are partial: they are marked
  ``sequence_parallel`` and megatron-core's ``finalize_model_grads`` sums them over
  the tensor-parallel ranks. Without it every rank computes the same gradient.

A is drawn whole, from a generator seeded by (seed, global layer number, layer
name), and sliced: the adapters, like the base model, start identical at any TP
and PP. B starts at zero, so step 0 computes exactly the base model.

DoRA (Liu et al. 2024) rescales each output row: ``y = m / |W + s B A|_row * (W + s B A) x``
(+ bias). As in Hugging Face ``peft``, the norm is treated as a constant (no
gradient through it); it is computed in fp32 over the *whole* input row (summed
over tensor-parallel ranks for row-parallel layers) and floored at a small
epsilon, so an all-zero row gives zero, not NaN. ``m`` starts as the base rows'
norms (:func:`init_magnitudes`, once the base weights are loaded).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from megatron_ext.peft.config import ADAPTER, COLUMN_PARALLEL, LINEARS, NORM_EPS, PeftArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterShape:
    """One adapter's place: its layer kind, full sizes and the tensor-parallel layout."""

    name: str  # linear_qkv | linear_proj | linear_fc1 | linear_fc2
    method: str  # lora | dora
    rank: int
    scaling: float
    dropout: float
    in_features: int  # the base layer's full input size
    out_features: int  # the base layer's full output size
    tp: int
    tp_rank: int
    sequence_parallel: bool
    gated: bool  # linear_fc1 of a gated MLP: local rows are [gate part; up part]

    @property
    def column(self) -> bool:
        return self.name in COLUMN_PARALLEL


def _tp_group(base):
    from megatron.core import parallel_state

    return getattr(base, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()


class Adapter(torch.nn.Module):
    """The low-rank factors (and DoRA's magnitude) of one linear layer, this rank's part."""

    def __init__(self, shape: AdapterShape, a_full: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.shape = shape
        r, tp, rank = shape.rank, shape.tp, shape.tp_rank
        if shape.column:
            a = a_full[rank * r // tp:(rank + 1) * r // tp]
            out_local = shape.out_features // tp
        else:
            cols = shape.in_features // tp
            a = a_full[:, rank * cols:(rank + 1) * cols]
            out_local = shape.out_features
        self.lora_A = torch.nn.Parameter(a.to(dtype).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, r, dtype=dtype))
        self.magnitude = (torch.nn.Parameter(torch.ones(out_local, dtype=dtype))
                          if shape.method == "dora" else None)
        replicated_partial = shape.sequence_parallel and not shape.column
        for param in self.parameters():
            # megatron-core's attributes: which parameters are split over tensor-parallel
            # ranks, and which hold per-rank partial gradients to be summed over them
            param.tensor_model_parallel = shape.column or param is self.lora_A
            param.partition_dim = 0 if shape.column else 1
            param.partition_stride = 1
            param.sequence_parallel = replicated_partial and param is not self.lora_A
        self.dropout = torch.nn.Dropout(shape.dropout) if shape.dropout else None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base) -> torch.Tensor:
        """``base_out`` (the base layer's output for input ``x``) plus this adapter's part."""
        from megatron.core.tensor_parallel import mappings

        s, group = self.shape, _tp_group(base)
        if s.column:
            x = (mappings.gather_from_sequence_parallel_region(x, group=group)
                 if s.sequence_parallel else mappings.copy_to_tensor_model_parallel_region(
                     x, group=group))
        if self.dropout is not None:
            x = self.dropout(x)
        z = F.linear(x, self.lora_A)
        if s.column:  # [.., r/tp] -> [.., r]; backward reduce-scatters the partial gradients
            z = mappings.all_gather_last_dim_from_tensor_parallel_region(z, group=group)
        elif s.sequence_parallel:
            z = mappings.reduce_scatter_to_sequence_parallel_region(z, group=group)
        else:
            z = mappings.reduce_from_tensor_model_parallel_region(z, group=group)
        lora = F.linear(z, self.lora_B) * s.scaling
        if self.magnitude is None:
            return base_out + lora
        scale = (self.magnitude.float() / self._row_norm(base)).to(base_out.dtype)
        bias = getattr(base, "bias", None)
        plain = base_out
        if bias is not None and not getattr(base, "skip_bias_add", False):
            plain = base_out - bias  # the bias is not rescaled
        return base_out + (scale - 1) * plain + scale * lora

    # ------------------------------------------------------------------ DoRA
    @torch.no_grad()
    def _row_norm(self, base) -> torch.Tensor:
        """``|W + s B A|`` per output row of this rank, over the whole input row (fp32)."""
        return self.row_norms(base.weight, _tp_group(base))

    def a_for_rows(self, group) -> torch.Tensor:
        """The A that multiplies this rank's B (fp32): for a column-parallel layer the whole
        A (every rank's rows, in rank order), else this rank's columns of it."""
        import torch.distributed as dist

        s = self.shape
        a = self.lora_A.float()
        if s.column and s.tp > 1:
            parts = [torch.empty_like(a) for _ in range(s.tp)]
            dist.all_gather(parts, a.contiguous(), group=group)
            a = torch.cat(parts, dim=0)
        return a

    def row_norms(self, weight, group) -> torch.Tensor:
        """``|weight + s B A|`` per row of this rank, over whole rows (fp32)."""
        import torch.distributed as dist

        s = self.shape
        merged = weight.float() + s.scaling * (self.lora_B.float() @ self.a_for_rows(group))
        squares = merged.square().sum(dim=1)
        if not s.column and s.tp > 1:
            dist.all_reduce(squares, group=group)
        return squares.sqrt().clamp_min(NORM_EPS)

    @torch.no_grad()
    def init_magnitude(self, base) -> None:
        """DoRA's magnitude := the adapted rows' norms (B = 0: the base rows'), so the
        adapted layer starts equal to the base."""
        if self.magnitude is not None:
            self.magnitude.copy_(self._row_norm(base).to(self.magnitude.dtype))

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str, sharded_offsets=(), metadata=None) -> dict:
        """This rank's tensors as megatron-core ``ShardedTensor``s of the whole factors:
        split ones along their tensor-parallel axis, the others replicated; the rows of
        a gated ``linear_fc1`` are laid out like its weight ([gate; up] of the whole)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        s = self.shape
        axes = ({"lora_A": 0, "lora_B": 0, "magnitude": 0} if s.column else {"lora_A": 1})
        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)
        if s.gated:
            for name in ("lora_B", "magnitude"):
                key = prefix + name
                if key in sharded:
                    sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


class AdaptedLinear:
    """Mixed into a megatron-core linear layer's class: its output plus its adapter's.

    The layer's own parameters, forward and checkpoint keys are unchanged; the
    adapter's tensors are saved under ``<layer>.adapter.*`` by :class:`Adapter`.
    """

    adapter: Adapter

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return self.adapter(input_, output, self), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = f"{prefix}{ADAPTER}."
        state = {key: value for key, value in state.items() if not key.startswith(own)}
        state.update(self.adapter.sharded_state_dict(own, sharded_offsets, metadata))
        return state


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if issubclass(cls, AdaptedLinear):
        return cls
    if cls not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[cls] = type(f"Adapted{cls.__name__}", (AdaptedLinear, cls), {})
    return _ADAPTED_CLASSES[cls]


def _init_a(rank: int, in_features: int, how: str, seed: int) -> torch.Tensor:
    """The whole A ``[r, in]``: the fan is the whole matrix's, whatever the TP."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, in_features)
    if how == "xavier":
        torch.nn.init.xavier_normal_(a, generator=generator)
    else:  # Hugging Face peft's and torch.nn.Linear's default
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


@dataclass
class AdapterReport:
    """What :func:`add_adapters` did, for the start-up log."""

    targets: tuple[str, ...]
    adapted_layers: int
    trainable: int  # adapter parameters on this rank
    total: int  # all parameters on this rank

    def line(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return (f"{self.adapted_layers} adapted linear layers ({', '.join(self.targets)}); "
                f"trainable {self.trainable:,} of {self.total:,} parameters on this rank "
                f"({share:.3f}%)")


def decoder_layers(model) -> list:
    """The transformer layers a (possibly wrapped) ``GPTModel`` builds on this stage."""
    inner = model
    while not hasattr(inner, "decoder") and hasattr(inner, "module"):
        inner = inner.module
    return list(inner.decoder.layers)


def _module(layer, path: str):
    module = layer
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _targets_in(layer, name: str) -> list[tuple[object, str]]:
    """The linear layers ``name`` (a short name of ``LINEARS``) stands for in ``layer``, each
    with what seeds its A: the dense module, or in a mixture of experts (``linear_fc1``,
    ``linear_fc2``) every expert's on this rank, by *global* expert index (so an expert's
    adapter starts the same at every EP)."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if experts is None or not name.startswith("linear_fc"):
        return [(_module(layer, LINEARS[name]), name)]
    from megatron.core import parallel_state

    first = parallel_state.get_expert_model_parallel_rank() * len(experts.local_experts)
    return [(getattr(expert, name), f"{name}/expert{first + index}")
            for index, expert in enumerate(experts.local_experts)]


def add_adapters(model, args: PeftArgs, targets: tuple[str, ...], seed: int) -> AdapterReport:
    """Wrap ``targets`` of every layer of ``model`` with adapters and freeze everything else.

    Only the adapters' parameters require gradients afterwards, so megatron-core's
    DDP gives the base weights no gradient buffers and the optimizer no state. Call
    before wrapping the model in DDP and before building the optimizer.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    count = 0
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in decoder_layers(model):
        number = int(layer.layer_number)  # global, 1-based
        for name, (base, seed_name) in ((name, target) for name in targets
                                        for target in _targets_in(layer, name)):
            column = name in COLUMN_PARALLEL
            shape = AdapterShape(
                name=name, method=args.peft, rank=args.peft_dim, scaling=args.scaling,
                dropout=args.peft_dropout, in_features=int(base.input_size),
                out_features=int(base.output_size), tp=tp, tp_rank=tp_rank,
                sequence_parallel=bool(getattr(base, "sequence_parallel", False)),
                gated=name == "linear_fc1" and bool(layer.config.gated_linear_unit))
            if column and base.output_size % tp or not column and base.input_size % tp:
                raise ValueError(f"{name}: size not divisible by TP {tp}")
            a_full = _init_a(args.peft_dim, shape.in_features, args.lora_A_init,
                             zlib.crc32(f"{seed}/{number}/{seed_name}".encode()))
            adapter = Adapter(shape, a_full, base.weight.dtype).to(base.weight.device)
            if not getattr(base.weight, "allreduce", True):  # an expert's: expert-parallel
                for parameter in adapter.parameters():  # (reduced over the expert-data-
                    parameter.allreduce = False  # parallel ranks, in the experts' optimizer)
            base.__class__ = _adapted_class(type(base))
            base.add_module(ADAPTER, adapter)
            count += 1
    _inputs_require_grad(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AdapterReport(targets, count, trainable, total)


def _make_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)


def _inputs_require_grad(model) -> None:
    """With activation recomputation, the first layer's input must require a gradient.

    megatron-core recomputes a layer inside an autograd Function that sees only its
    tensor inputs: when none requires a gradient (the frozen embeddings' output), the
    layer's parameters, the adapters, get none. Later pipeline stages receive inputs
    that require gradients already.
    """
    inner = model
    while not hasattr(inner, "decoder") and hasattr(inner, "module"):
        inner = inner.module
    if getattr(inner, "pre_process", False) and \
            getattr(inner.config, "recompute_granularity", None) is not None:
        inner.embedding.register_forward_hook(_make_require_grad)


def adapters(model) -> Iterator[tuple[object, Adapter]]:
    """(base layer, its adapter) for every adapted layer of ``model``."""
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            yield module, module.adapter


def init_magnitudes(model) -> None:
    """DoRA: every magnitude from its (now loaded) base weights; a no-op for LoRA."""
    for base, adapter in adapters(model):
        adapter.init_magnitude(base)


def is_adapter_key(key: str) -> bool:
    """A state-dict or checkpoint key of an adapter tensor (optimizer state included)."""
    return f".{ADAPTER}." in key


@torch.no_grad()
def merge_into_base(model) -> None:
    """Fold every adapter into its base weight (this rank's part) and drop it: the model
    then computes the adapted function at plain-model cost (inference)."""
    from megatron_ext.peft.merge import merged_weight

    for base, adapter in list(adapters(model)):
        group = _tp_group(base)
        norms = None
        if adapter.magnitude is not None:  # over whole rows: summed over TP when split
            norms = adapter.row_norms(base.weight, group)
        base.weight.copy_(merged_weight(base.weight, adapter.a_for_rows(group),
                                        adapter.lora_B, adapter.shape.scaling,
                                        adapter.magnitude, norms))
        del base._modules[ADAPTER]
        base.__class__ = type(base).__mro__[2]  # the class before _adapted_class


__all__ = ["AdapterReport", "AdapterShape", "add_adapters", "adapters", "init_magnitudes",
           "is_adapter_key", "merge_into_base"]
