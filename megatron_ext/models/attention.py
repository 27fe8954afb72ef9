"""``PortableAttention``: megatron-core's local core attention on PyTorch SDPA.

Why: megatron-core's local ``DotProductAttention`` materialises the full
``[b, np, sq, sk]`` score tensor (``baddbmm`` into a global buffer, a torch
softmax, a ``bmm``). PyTorch's SDPA computes the same thing with fused kernels
on every device (the flash-attention CPU kernel here, flash/efficient kernels
on GPUs) and no score buffer. ``PortableAttention`` is a drop-in replacement
(same constructor and forward; it subclasses ``DotProductAttention`` so
``isinstance`` checks, attributes and ``sharded_state_dict`` stay the same),
and :func:`portable_layer_spec` puts it into megatron-core's local GPT layer spec.

Semantics kept from megatron-core 0.16.1's local path:

* ``attention_mask`` is bool, True = masked out (inverted here for SDPA, whose
  bool mask means True = attend); it broadcasts to ``[b, np, sq, sk]``.
* ``attention_mask=None`` with a causal layer means causal (bottom-right
  aligned, so one query against a KV cache sees every key, as upstream);
  ``None`` with a non-causal layer means no mask.
* Scale: ``softmax_scale`` (default ``1/sqrt(hn)``). With
  ``apply_query_key_layer_scaling`` upstream divides the scores by the layer
  number and multiplies them back inside the softmax; the net scale is the
  same, so SDPA just gets the undivided scale.
* GQA: key/value heads ``ng`` are shared by ``np/ng`` consecutive query heads
  (``repeat_interleave``; SDPA's ``enable_gqa`` has the same grouping).
* Dropout on the attention probabilities only in training mode, inside the
  tensor-parallel RNG tracker's ``fork()`` unless sequence-parallel. The
  dropout mask is drawn with the same shape from the same generator state, so
  on torch 2.13 (math backend) it is the very mask upstream draws.
* Sliding window (``config.window_size = (left, right)``, on the layers that
  ``window_attn_skip_freq`` selects): query ``i`` may attend key ``j`` iff
  ``-right <= (i + sk - sq) - j <= left``, i.e. ``0 <= i - j <= left`` for
  self-attention with ``right = 0``. **Difference:** upstream's
  ``FusedScaleMaskSoftmax.forward_torch_softmax`` *replaces* the given mask by
  this window mask, silently dropping padding and packing masks (packed samples
  then see each other); here the window is ANDed with the given mask. The two
  agree whenever the given mask is plain causal or ``None``.
* Rows whose every key is masked (never produced by
  ``megatron_ext.models.masks.attention_mask``, where padding attends to
  itself): upstream returns the mean of ``v`` over all keys (every score is
  filled with -10000, a uniform softmax), SDPA returns zeros.

Not handled by SDPA, so delegated to the upstream ``forward`` unchanged:
``softmax_type`` other than ``"vanilla"`` (softmax offsets). Like upstream,
``packed_seq_params`` and ``attention_bias`` are refused.

Context parallelism (``config.context_parallel_size`` CP > 1; megatron-core's
local attention refuses it, only Transformer Engine's supports it): each CP
rank holds the queries, keys and values of its own positions
(``megatron_ext.data.collate.zigzag_indices``), all-gathers the keys and
values of the CP group (one collective for both; its backward reduce-scatters
their gradients back to the ranks that own them: megatron-core's sequence
parallel gather on the CP group) and runs one SDPA call of its queries over
all keys. The mask is then ``[b, 1, sq, CP * sq]`` with the keys in gathered
order (``megatron_ext.models.masks.attention_mask`` with ``cp_size``); the
causal default (mask ``None``) and the sliding window are built here from the
same global positions. Per rank, attention memory holds the whole row's keys
and values (CP times its own share) and the scores of its queries: a ring
(pass K/V blocks round the ranks, online softmax) would bound that too.
Attention dropout under CP draws each rank's own mask (the project trains
with dropout 0).

GPU fast path: with ``flash_attn`` importable (imported lazily, on first use),
CUDA fp16/bf16 tensors, and a mask that is ``None`` (causal layer) or exactly
the causal mask, :func:`_flash_attention` calls ``flash_attn_func`` (native
GQA and sliding window). Everything else, and every CPU call, takes SDPA.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_ext.data.collate import gathered_positions, zigzag_indices


def window_allowed(sq: int, sk: int, window_size, device) -> torch.Tensor:
    """``[sq, sk]`` bool, True where the sliding window lets query ``i`` see key ``j``.

    Same band as megatron-core's ``get_sliding_window_causal_mask`` (which
    returns its complement on ``device="cuda"``): bottom-right aligned,
    ``-right <= (i + sk - sq) - j <= left``.
    """
    left, right = window_size
    ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
    return torch.tril(torch.triu(ones, diagonal=sk - sq - left), diagonal=sk - sq + right)


def causal_allowed(sq: int, sk: int, device) -> torch.Tensor:
    """``[sq, sk]`` bool causal mask (True = attend), bottom-right aligned like a KV cache."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def context_parallel_allowed(sq: int, cp_size: int, cp_rank: int, window_size, device
                             ) -> torch.Tensor:
    """``[sq, cp_size * sq]`` bool (True = attend) of CP rank ``cp_rank``: its queries'
    global positions against the gathered keys' (rank order), causal, or the sliding
    window band ``-right <= i - j <= left`` when ``window_size`` is given (as
    :func:`window_allowed` for ``sq == sk``)."""
    length = sq * cp_size
    query = zigzag_indices(length, cp_size, cp_rank).to(device)[:, None]
    key = gathered_positions(length, cp_size).to(device)[None, :]
    if window_size is None:
        return key <= query
    left, right = window_size
    return (key <= query + right) & (query <= key + left)


def _allowed_by(attention_mask: torch.Tensor) -> torch.Tensor:
    """megatron-core's mask (True or non-zero = masked out) as SDPA's (True = attend)."""
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    return ~attention_mask


class PortableAttention(DotProductAttention):
    """Local core attention computed by ``torch.nn.functional.scaled_dot_product_attention``.

    Constructor and forward are ``DotProductAttention``'s; the extra keyword
    ``use_flash_attn`` (default True) allows the CUDA ``flash_attn`` fast path
    when it applies (see the module docstring). Input ``query``
    ``[sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]``; output
    ``[sq, b, np * hn]``.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, use_flash_attn: bool = True):
        cp_size = config.context_parallel_size
        local = config
        if cp_size > 1:  # upstream asserts CP == 1 (only TE's attention has CP); CP is ours
            local = copy.copy(config)
            local.context_parallel_size = 1
        super().__init__(local, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        self.cp_size = cp_size
        self.cp_group = None
        if cp_size > 1:
            from megatron.core import parallel_state

            self.cp_group = (getattr(pg_collection, "cp", None)
                             or parallel_state.get_context_parallel_group())
            assert self.cp_group.size() == cp_size, (self.cp_group.size(), cp_size)
        # upstream splits the scale into softmax_scale / coeff and a coeff applied
        # inside the softmax (fp16 overflow guard); SDPA gets the product
        coeff = self.scale_mask_softmax.scale
        self.sdpa_scale = self.softmax_scale * (coeff if coeff is not None else 1.0)
        self.window_size = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        self.use_flash_attn = use_flash_attn
        self._mask_cache = {}

    # ------------------------------------------------------------------ forward
    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """Attention of ``query`` over ``key``/``value``; ``[sq, b, np * hn]``."""
        if self.softmax_offset is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        assert packed_seq_params is None, "PortableAttention does not take packed_seq_params"
        assert attention_bias is None, "PortableAttention does not take attention_bias"
        sq, b, np_, hn = query.shape
        if self.cp_size > 1:
            key, value = self._gather_keys_values(key, value)
        sk = key.shape[0]
        dropout_p = self.attention_dropout.p if self.training else 0.0

        with self._dropout_rng(dropout_p):
            if (self.use_flash_attn and self.cp_size == 1
                    and _flash_eligible(self, query, key, attention_mask)):
                context = _flash_attention(self, query, key, value, attention_mask, dropout_p)
            else:
                context = self._sdpa(query, key, value, attention_mask, dropout_p, sq, sk)
        return context.reshape(sq, b, np_ * hn)

    def _gather_keys_values(self, key, value):
        """Every CP rank's keys and values, in rank order (``[CP * sk, b, ng, hn]`` each);
        the backward sums each rank's gradients into the owner's share."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        groups = key.shape[2]
        both = torch.cat([key, value], dim=2).contiguous()
        both = gather_from_sequence_parallel_region(both, tensor_parallel_output_grad=True,
                                                    group=self.cp_group)
        return both[:, :, :groups], both[:, :, groups:]

    def _dropout_rng(self, dropout_p: float):
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _sdpa(self, query, key, value, attention_mask, dropout_p, sq, sk):
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        allowed, is_causal = self._allowed(attention_mask, sq, sk, query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=self.sdpa_scale)
        # [b, np, sq, hn] -> [sq, b, np, hn]
        return out.permute(2, 0, 1, 3)

    def _allowed(self, attention_mask, sq, sk, device):
        """(SDPA bool mask with True = attend, or None; is_causal)."""
        if self.cp_size > 1:
            return self._allowed_context_parallel(attention_mask, sq, sk, device), False
        if attention_mask is not None:
            allowed = _allowed_by(attention_mask)
            if self.window_size is not None:
                allowed = allowed & self._cached("window", sq, sk, device)
            return allowed, False
        if self.window_size is not None:  # upstream: the window mask alone
            return self._cached("window", sq, sk, device), False
        if self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                return None, True
            return self._cached("causal", sq, sk, device), False
        return None, False

    def _allowed_context_parallel(self, attention_mask, sq, sk, device):
        """Under CP: the given mask (keys in gathered order) ANDed with the window band of
        the global positions; without a mask, that band or the causal one."""
        assert sk == sq * self.cp_size, (
            f"context parallel attention needs CP x {sq} keys, got {sk} (no KV cache under CP)")
        if attention_mask is not None:
            allowed = _allowed_by(attention_mask)
            if self.window_size is not None:
                allowed = allowed & self._cached("cp_window", sq, sk, device)
            return allowed
        if self.window_size is not None:  # upstream: the window mask alone
            return self._cached("cp_window", sq, sk, device)
        if self.attn_mask_type == AttnMaskType.causal:
            return self._cached("cp_causal", sq, sk, device)
        return None

    def _cached(self, kind, sq, sk, device):
        key = (kind, sq, sk, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            if kind.startswith("cp_"):
                window = self.window_size if kind == "cp_window" else None
                mask = context_parallel_allowed(sq, self.cp_size, self.cp_group.rank(), window,
                                                device)
            else:
                mask = (window_allowed(sq, sk, self.window_size, device) if kind == "window"
                        else causal_allowed(sq, sk, device))
            self._mask_cache[key] = mask
        return mask


# ---------------------------------------------------------------- GPU fast path
# Only reached with CUDA tensors; flash_attn is imported on the first such call.
_FLASH = {"checked": False, "func": None}
_CAUSAL_VERDICT = {"mask": None, "version": None, "causal": False}


def _flash_attn_func():
    if not _FLASH["checked"]:
        _FLASH["checked"] = True
        try:
            from flash_attn import flash_attn_func
        except Exception:  # not installed, or built for another torch/CUDA
            flash_attn_func = None
        _FLASH["func"] = flash_attn_func
    return _FLASH["func"]


def _is_plain_causal(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """Whether ``mask`` (True = masked) is exactly the causal mask for every batch row.

    The check costs a device sync, so the verdict is kept for the last mask
    object seen (every layer of one forward gets the same mask tensor).
    """
    cached = _CAUSAL_VERDICT["mask"]
    if cached is not None and cached() is mask and _CAUSAL_VERDICT["version"] == mask._version:
        return _CAUSAL_VERDICT["causal"]
    causal = (mask.dtype == torch.bool and sq == sk and mask.dim() >= 2
              and tuple(mask.shape[-2:]) == (sq, sk)
              and all(d == 1 for d in mask.shape[-3:-2])  # one mask for all heads
              and bool(torch.equal(mask, (~causal_allowed(sq, sk, mask.device)).expand_as(mask))))
    _CAUSAL_VERDICT.update(mask=weakref.ref(mask), version=mask._version, causal=causal)
    return causal


def _flash_eligible(module: PortableAttention, query, key, attention_mask) -> bool:
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if module.config.deterministic_mode or query.shape[-1] > 256:
        return False
    if not _flash_mask_ok(module, attention_mask, query.shape[0], key.shape[0]):
        return False
    return _flash_attn_func() is not None


def _flash_mask_ok(module: PortableAttention, attention_mask, sq: int, sk: int) -> bool:
    """Whether :func:`_flash_attention` reproduces the SDPA path's masking exactly."""
    if attention_mask is None:
        # causal layer (or a window band): yes; a non-causal layer without window: no mask
        return module.attn_mask_type == AttnMaskType.causal or module.window_size is not None
    return _is_plain_causal(attention_mask, sq, sk)


def _flash_attention(module: PortableAttention, query, key, value, attention_mask, dropout_p):
    """``flash_attn_func`` on ``[b, s, n, hn]``; returns ``[sq, b, np, hn]``."""
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))
    if module.window_size is None:
        causal, window = True, (-1, -1)
    elif attention_mask is None:  # upstream: the window band alone
        causal, window = False, module.window_size
    else:  # causal mask AND window
        causal, window = True, (module.window_size[0], 0)
    out = _flash_attn_func()(q, k, v, dropout_p=dropout_p, softmax_scale=module.sdpa_scale,
                             causal=causal, window_size=window)
    return out.transpose(0, 1)


# ----------------------------------------------------------------- layer spec
def use_portable_attention(spec, use_flash_attn: bool = True):
    """A copy of a GPT layer (or block) ``spec`` whose self-attention core is ``PortableAttention``.

    Nothing shared is mutated: the layer spec, its submodules, the
    self-attention spec and its submodules are replaced, not edited.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(spec, "layer_specs"):  # a block spec: every layer's
        return dataclasses.replace(spec, layer_specs=[
            use_portable_attention(layer, use_flash_attn) for layer in spec.layer_specs])
    self_attention = spec.submodules.self_attention
    core = ModuleSpec(module=PortableAttention, params={"use_flash_attn": use_flash_attn})
    attention_submodules = dataclasses.replace(self_attention.submodules, core_attention=core)
    self_attention = dataclasses.replace(self_attention, submodules=attention_submodules)
    submodules = dataclasses.replace(spec.submodules, self_attention=self_attention)
    return dataclasses.replace(spec, submodules=submodules)


def portable_layer_spec(normalization: Optional[str] = None, use_flash_attn: bool = True):
    """megatron-core's ``get_gpt_layer_local_spec`` with ``PortableAttention`` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return use_portable_attention(get_gpt_layer_local_spec(normalization=normalization),
                                  use_flash_attn=use_flash_attn)
