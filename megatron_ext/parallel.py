"""The parallel layout and process-group setup: NCCL on GPUs, gloo (plus the compat
layer) on CPU.

Why on its own floor: the trainer, inference, checkpoint resharding and the
converters' checks all need megatron-core's groups initialised the same way;
none of them should reach into another for it. megatron-core needs
``torch.distributed`` and its ``parallel_state`` initialised in a fixed
order, seeded so that every TP layout draws the same initial weights.
:func:`init_distributed` does that once and returns a :class:`Layout` that
callers pass around instead of querying globals.

torch and megatron-core are imported inside the functions that use them:
``ParallelArgs`` is part of the command-line configuration, which is parsed
and validated before either is imported.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_ext.cli import option
from megatron_ext.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParallelArgs:
    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks (TP)")
    pipeline_model_parallel_size: int = option(1, "pipeline stages (PP); the data-parallel size "
                                                  "is the world size / (TP x PP x CP)")
    context_parallel_size: int = option(
        1, "context-parallel ranks (CP) for long sequences: each row is split into 2 x CP "
           "chunks, rank r keeping chunks r and 2CP-1-r; attention gathers the keys and values "
           "of the CP ranks (PyTorch SDPA: no flash-attn under CP)")
    sequence_parallel: bool = option(False, "split layer norms and dropout along the sequence "
                                            "over the tensor-parallel ranks (needs TP > 1)")
    use_distributed_optimizer: bool = option(False, "shard the optimizer state over the "
                                                    "data-parallel ranks (CUDA only)")

    @property
    def sequence_multiple(self) -> int:
        """What every batch row's width must be a multiple of: 2 x CP chunks (CP > 1), and
        each CP rank's share split over the TP ranks under sequence parallelism."""
        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        multiple = 2 * cp if cp > 1 else 1
        if self.sequence_parallel:
            multiple = math.lcm(multiple, cp * tp)
        return multiple


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    cp: int = 1  # context-parallel ranks (a data-parallel group's ranks share its batches)
    cp_rank: int = 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """Rank 0 prints and writes logs."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(tp: int, pp: int, seed: int, timeout_minutes: int = 30, *,
                     cp: int = 1) -> Layout:
    """Initialise torch.distributed (from torchrun's env) and megatron-core's groups.

    ``cp``: context-parallel size; megatron-core's groups then reduce gradients over the
    data-parallel x context-parallel ranks (``Layout.dp`` counts data replicas only)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}"
                          + (f" x CP {cp}" if cp > 1 else ""))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_ext.compat import enable_cpu_compat

        enable_cpu_compat()
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "WORLD_SIZE" not in os.environ:
            # one process started without torchrun (a tool): it needs no agreed port, so any
            # free one, never an inherited MASTER_PORT that another process may hold
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Layout(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        cp=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_ORPHAN_WATCH = False
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` (default SIGKILL) to this process when its parent ends.

    The kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) reaches a process
    whatever it is doing (importing, waiting in a futex, holding the GIL). It is not
    inherited by children. Returns whether it is set (False off Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_orphaned(parent: int) -> None:
    agent = "" if parent == 1 else f" (pid {parent})"
    sys.stderr.write(f"rank {os.environ.get('RANK', '?')}: the torchrun agent{agent} "
                     "is gone; exiting\n")
    sys.stderr.flush()
    os._exit(1)


def exit_when_orphaned(interval: float = 1.0) -> bool:
    """Under torchrun: exit this worker as soon as its agent dies. Call it first thing.

    Why: torchrun starts each worker in a session of its own, so killing the agent
    (``kill -9``, the kernel's out-of-memory killer) reaches no worker; the workers
    would sit in a collective, holding their memory, until the collective times out
    (30 minutes and more). Three guards:

    * the kernel's parent-death signal (:func:`die_with_parent`, SIGKILL) from this call
      on, whatever the worker is doing then;
    * a worker whose parent is already init (pid 1) was orphaned before it got here
      (its agent was killed while it imported): it exits now;
    * a daemon thread watches the parent process id and exits within ``interval``
      seconds of a change (the guard where ``prctl`` is missing; ``os._exit``: the other
      ranks are gone or going, no clean shutdown is possible).

    Whatever the worker started itself must end with it too: megatron-core's
    checkpoint-writer process does (``checkpointing.dist.start_checkpoint_writer``).

    Returns whether it watches (only when started by torchrun).
    """
    import threading

    global _ORPHAN_WATCH
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if _ORPHAN_WATCH:  # one watcher per process (a test worker runs many trainings)
        return True
    _ORPHAN_WATCH = True
    parent = os.getppid()
    die_with_parent()
    if parent == 1 or os.getppid() != parent:  # re-parented already: the agent is gone
        _exit_orphaned(parent)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                _exit_orphaned(parent)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
    return True
