"""The training patches of the CPU compatibility layer (see the package doc).

Why: megatron-core assumes CUDA in a few dozen places (``device="cuda"``,
``torch.cuda.current_device()``, the CUDA RNG tracker, a CUDA type assert in
grad clipping and the mixed-precision and distributed optimizers). On a machine
without a GPU we still want real TP/PP/DP training, in fp32, bf16 and fp16, with the
plain or the distributed optimizer, for tests and demos. :func:`enable_cpu_compat`
applies ten patches, and only when ``torch.cuda.is_available()`` is false, so nothing
changes on GPUs. See ``docs/notes/megatron-core-cpu.md`` for how each was found and
shown necessary.

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (it is
   used as ``device=`` for buffers; on a CPU build it can only raise).
2. ``torch.cuda.synchronize`` and friends become no-ops.
3. The tensor-parallel RNG tracker tracks the CPU generator.
4. ``Tensor.type()`` called from megatron-core names the CUDA type of a CPU
   tensor (``torch.cuda.BFloat16Tensor`` for ``torch.BFloat16Tensor``): megatron-core
   tells fp32 from half-precision parameters, and checks its gradients, by comparing
   those strings (``optimizer/optimizer.py:671,690``
   ``Float16OptimizerWithFloat16Params.__init__``, ``optimizer/distrib_optimizer.py:361,
   420,582`` ``DistributedOptimizer._build_model_and_main_param_groups`` and
   ``_get_model_param_range_map``'s callers, ``optimizer/clip_grads.py:167``
   ``clip_grad_by_total_norm_fp32``); on CPU they raise ``TypeError: Wrapped parameters
   must be one of torch.cuda.FloatTensor...`` or fail the assert. Everything else those
   classes do (fp32 main copies, the grad scaler, ``found_inf``, the reduce-scatter and
   all-gather of the distributed optimizer's buffers) runs on CPU unchanged; other
   callers of ``Tensor.type()`` still see the truth.
5. A thread-local ``TorchFunctionMode`` redirects literal ``device="cuda"``
   tensor creation, ``Tensor.cuda()`` and ``pin_memory=True`` to the CPU (the grad
   scaler's and the mixed-precision optimizer's ``found_inf`` and scale tensors among
   them), and does patch 4.
6. ``torch.cuda.Stream``, ``current_stream`` and ``stream`` stand for the host's one
   stream (:class:`HostStream`): megatron-core's MoE token dispatchers create a side
   stream for their device-to-host copies.
7. ``te_general_gemm`` is bound (None) in megatron-core's ``moe_utils``, which tests
   it without Transformer Engine (a ``NameError`` in every MoE router).
8. The alltoall dispatcher's split sizes are numpy arrays on the host as on GPUs
   (``all_to_all_single`` refuses them as tensors).
9. Tensor parallelism's all-gather and reduce-scatter of uneven shares (the alltoall
   dispatcher's tokens at TP > 1 with expert parallelism) go through equal padded shares:
   gloo refuses tensors of different sizes in one all-gather.
10. Every gloo process group of the process shares one gloo device (``_patch_gloo_groups``),
   so one event-loop thread serves them all instead of one per group. megatron-core makes
   about 25 groups, and each idle loop thread wakes from ``epoll_wait`` every 10 ms: 26
   threads cost 33 ms of CPU a second doing nothing, one 4 ms (measured); collectives cost
   the same. Not megatron-core's code, but its groups are what make it matter.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
_ENABLED = False
_MODE = None


def _is_cuda(device) -> bool:
    if isinstance(device, bool) or device is None:
        return False
    if isinstance(device, int):  # a bare index means "accelerator <index>"
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def cuda_type_name(tensor: torch.Tensor) -> str:
    """``tensor.type()`` as megatron-core expects it of a tensor on the GPU
    (``torch.BFloat16Tensor`` -> ``torch.cuda.BFloat16Tensor``)."""
    name = torch.Tensor.type(tensor)
    if tensor.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
        return "torch.cuda." + name[len("torch."):]
    return name


def _called_from_megatron_core() -> bool:
    # frame 0: this function; 1: __torch_function__; 2: whoever called Tensor.type()
    return sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.core.")


class CudaToCpu(TorchFunctionMode):
    """Redirects CUDA placement of new tensors to the CPU (patch 5), and shows
    megatron-core the CUDA type names it checks for (patch 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs \
                and _called_from_megatron_core():
            return cuda_type_name(args[0])
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None


def _patch_rng_tracker() -> None:
    """Make megatron-core's CUDA RNG tracker keep CPU generator states."""
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # upstream's logic; its "CPU state changed inside a GPU fork" warning is
        # meaningless here, where the forked state *is* the CPU generator
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_name = self._current_state_name
        outer_state = torch.get_rng_state()
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state
    tp_random.CudaRNGStatesTracker.add = add
    tp_random.CudaRNGStatesTracker.fork = fork


class HostStream:
    """What megatron-core's MoE token dispatchers ask of a CUDA stream, on the host (patch 6):
    work is already ordered, so waiting and events are no-ops. A class (``torch.cuda.Stream``
    stays a type: libraries annotate with ``torch.cuda.Stream | None``), one instance."""

    _instance: "HostStream | None" = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> "HostStream":
        return self

    def synchronize(self) -> None:  # as an event (record_event's result) too
        pass

    def query(self) -> bool:
        return True


_HOST_STREAM = HostStream()


def _patch_cuda_streams() -> None:
    """Patch 6: ``torch.cuda.Stream()``, ``current_stream()`` and ``stream(...)`` on the host.

    megatron-core's alltoall token dispatcher (``transformer/moe/token_dispatcher.py``
    ``MoEAlltoAllTokenDispatcher.__init__`` and ``_maybe_dtoh_and_synchronize``) and its
    overlapped shared experts (``shared_experts.py``) create a side stream and copy the
    routing counts to the host on it; on a CPU build ``torch.cuda.Stream()`` raises
    ``torch.cuda.Stream requires CUDA support``. On the host there is one stream: the
    copies happen in program order and every wait is already satisfied.
    """
    torch.cuda.Stream = HostStream
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_moe_utils() -> None:
    """Patch 7: bind ``te_general_gemm`` (None) in megatron-core's ``moe_utils``.

    ``transformer/moe/moe_utils.py`` imports ``te_general_gemm`` only with Transformer
    Engine, but ``RouterGatingLinearFunction`` (the router's logits, every MoE forward and
    backward) tests ``te_general_gemm is not None``: a ``NameError`` without it. None is
    what the test means: the router's logits then come from ``torch.mm``.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_alltoall_splits() -> None:
    """Patch 8: the alltoall dispatcher's split sizes become numpy arrays on the host too.

    ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` turns its per-rank token
    counts into numpy arrays with ``moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)``,
    which converts only tensors on the GPU; a CPU tensor stays a tensor and
    ``torch.distributed.all_to_all_single`` then refuses it as ``input_split_sizes``
    (``TypeError: all_to_all_single(): incompatible function arguments``). On the host the
    conversion is the same copy-free ``.numpy()`` the GPU path ends with.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    upstream = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def _patch_uneven_tp_collectives() -> None:
    """Patch 9: uneven all-gather / reduce-scatter along the first dimension, padded.

    ``tensor_parallel/mappings.py`` ``_gather_along_first_dim`` and
    ``_reduce_scatter_along_first_dim`` with split sizes (called by the alltoall token
    dispatcher's ``dispatch_postprocess`` / ``combine_preprocess`` at TP > 1, where each
    TP rank holds its own number of routed tokens) use ``all_gather`` / ``reduce_scatter``
    of a list of tensors of different sizes; gloo refuses them (``ProcessGroupGloo::
    allgather: invalid tensor size``). Every share is padded with zero rows to the largest
    one, the equal-size collective runs, and the padding is dropped: the same sums and
    the same rows, in the same order.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = (mappings._gather_along_first_dim,
                              mappings._reduce_scatter_along_first_dim)

    def _gather_along_first_dim(input_, group, output_split_sizes=None,
                                use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        output = input_.new_empty((group.size() * rows, *input_.shape[1:]))
        dist.all_gather_into_tensor(output, _padded_rows(input_, rows), group=group)
        return torch.cat([share[:size] for share, size in
                          zip(output.split(rows), output_split_sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        rows = max(input_split_sizes)
        shares = torch.split(input_, list(input_split_sizes), dim=0)
        output = input_.new_empty((rows, *input_.shape[1:]))
        dist.reduce_scatter_tensor(output, torch.cat([_padded_rows(share, rows)
                                                      for share in shares]), group=group)
        return output[:input_split_sizes[group.rank()]]

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


_GLOO_DEVICES: list = []


def _gloo_devices() -> list:
    """This process's gloo devices, made once as torch makes them for each group (one per
    interface of ``GLOO_SOCKET_IFNAME``, else the default one for this host)."""
    from torch.distributed import ProcessGroupGloo

    if not _GLOO_DEVICES:
        interfaces = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")
                      if name]
        _GLOO_DEVICES.extend([ProcessGroupGloo.create_device(interface=name)
                              for name in interfaces] or
                             [ProcessGroupGloo.create_default_device()])
    return _GLOO_DEVICES


def _patch_gloo_groups() -> None:
    """Patch 10: ``torch.distributed`` makes its gloo groups with one shared set of devices.

    ``new_group`` and ``init_process_group`` build a gloo group as
    ``ProcessGroupGloo(store, rank, size, timeout=...)``, which makes a new device, with its
    own event-loop thread, for every group. The class they call is replaced by a subclass
    that passes options naming the shared devices (and torch's own default of two worker
    threads per device); a caller that passes options keeps them."""
    from torch.distributed import ProcessGroupGloo, distributed_c10d

    class SharedGlooDevice(ProcessGroupGloo):
        def __init__(self, store, rank, size, timeout=datetime.timedelta(minutes=30)):
            if isinstance(timeout, ProcessGroupGloo._Options):
                super().__init__(store, rank, size, timeout)
                return
            options = ProcessGroupGloo._Options()
            options._devices = list(_gloo_devices())
            options._threads = 2 * len(options._devices)
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    if distributed_c10d.ProcessGroupGloo is ProcessGroupGloo:
        distributed_c10d.ProcessGroupGloo = SharedGlooDevice


def enable_cpu_compat() -> bool:
    """Apply the patches once if there is no CUDA device; returns whether they are active."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_cuda_streams()
    _patch_moe_utils()
    _patch_alltoall_splits()
    _patch_uneven_tp_collectives()
    _patch_gloo_groups()
    _MODE = CudaToCpu()
    _MODE.__enter__()
    _ENABLED = True
    logger.debug("megatron-core CPU compatibility layer enabled")
    return True

