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
from typing import TYPE_CHECKING, Optional

from megatron_ext.cli import option
from megatron_ext.compat import skip_jit_fuser_on_cpu
from megatron_ext.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Every process that runs megatron-core reaches it through this module (the layout, the
# process groups), and imports it later: on CPU, its torch.compile decorators are skipped
# before they cost their import (compat's doc).
skip_jit_fuser_on_cpu()


@dataclass(frozen=True)
class ModelShape:
    """What of a model's shape a parallel layout splits: attention heads over the TP ranks,
    layers over the PP stages."""

    num_layers: int
    num_attention_heads: int
    num_attention_heads_kv: int
    head_dim: int
    num_experts: Optional[int] = None  # experts per MoE layer (split over the EP ranks)

    @classmethod
    def of(cls, num_layers: int, num_attention_heads: int, hidden_size: int,
           num_attention_heads_kv: Optional[int] = None,
           kv_channels: Optional[int] = None, num_experts: Optional[int] = None,
           **_other) -> "ModelShape":
        """From a model's settings (``ModelArgs`` fields, or a run config's ``model``
        dict as ``**model``); the others are ignored."""
        return cls(num_layers, num_attention_heads,
                   num_attention_heads_kv or num_attention_heads,
                   kv_channels or hidden_size // max(1, num_attention_heads), num_experts)


@dataclass(frozen=True)
class ParallelArgs:
    """The parallel layout of a run: the one type the trainer, the launcher, inference and
    the reshard tool take, and the one place its rules live (:meth:`problems`)."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks (TP)",
                                             names=("--tensor_model_parallel_size", "-T"))
    pipeline_model_parallel_size: int = option(
        1, "pipeline stages (PP); the data-parallel size is the world size / (TP x PP x CP)",
        names=("--pipeline_model_parallel_size", "-P"))
    context_parallel_size: int = option(
        1, "context-parallel ranks (CP) for long sequences: each row is split into 2 x CP "
           "chunks, rank r keeping chunks r and 2CP-1-r; attention gathers the keys and values "
           "of the CP ranks (PyTorch SDPA: no flash-attn under CP)",
        names=("--context_parallel_size", "-C"))
    sequence_parallel: bool = option(False, "split layer norms and dropout along the sequence "
                                            "over the tensor-parallel ranks (needs TP > 1)")
    use_distributed_optimizer: bool = option(
        False, "shard the optimizer state (and fp32 main weights) over the data-parallel "
               "ranks (ZeRO-1: gradients reduce-scattered, weights all-gathered)")
    overlap_grad_reduce: bool = option(
        False, "reduce each gradient bucket while the backward pass goes on (megatron-core's "
               "DDP; same results)")
    overlap_param_gather: bool = option(
        False, "all-gather the updated weights during the next forward pass (needs "
               "--use_distributed_optimizer; same results)")
    expert_model_parallel_size: int = option(
        1, "expert-parallel ranks (EP): each holds --num_experts / EP experts of every MoE "
           "layer, tokens travel to their experts' ranks (--moe_token_dispatcher_type); the "
           "TP x EP ranks of an expert group come from the data-parallel ranks, so TP x PP x "
           "EP must divide the world size")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: TP x PP x CP."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def sequence_multiple(self) -> int:
        """What every batch row's width must be a multiple of: 2 x CP chunks (CP > 1), and
        each CP rank's share split over the TP ranks under sequence parallelism."""
        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        multiple = 2 * cp if cp > 1 else 1
        if self.sequence_parallel:
            multiple = math.lcm(multiple, cp * tp)
        return multiple

    def problems(self, world_size: Optional[int] = None, *, world: Optional[str] = None,
                 micro_batch_size: Optional[int] = None,
                 global_batch_size: Optional[int] = None, seq_length: Optional[int] = None,
                 model: Optional[ModelShape] = None) -> list[str]:
        """Everything this layout and the run disagree on, one sentence each (empty: fine).

        Each rule is checked when its inputs are given: ``world_size`` (the processes;
        ``world`` says where the number comes from, e.g. the launcher's nodes x GPUs),
        the batch sizes (the global batch splits into micro-batches on every
        data-parallel rank), ``seq_length`` (rows split into CP chunks and over TP under
        sequence parallelism) and the ``model`` shape (heads over TP, layers over PP).
        Pure: no torch, so every command checks its flags before importing it.
        """
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        cp = self.context_parallel_size
        if tp < 1 or pp < 1 or cp < 1:
            return ["--tensor_model_parallel_size, --pipeline_model_parallel_size and "
                    "--context_parallel_size must be >= 1"]
        problems = []
        dp = None
        if world_size is not None:
            if world_size % self.model_parallel_size:
                problems.append(f"{world or f'world size {world_size} is'} not divisible by "
                                f"TP {tp} x PP {pp}" + (f" x CP {cp}" if cp > 1 or world
                                                        else ""))
            else:
                dp = world_size // self.model_parallel_size
        ep = self.expert_model_parallel_size
        if ep < 1:
            problems.append("--expert_model_parallel_size must be >= 1")
        elif ep > 1 and world_size is not None and world_size % (tp * pp * ep):
            problems.append(f"{world or f'world size {world_size} is'} not divisible by "
                            f"TP {tp} x PP {pp} x EP {ep} (each pipeline stage's ranks form "
                            "expert groups of TP x EP ranks)")
        if model is not None:
            problems += self._model_problems(model)
        if (dp is not None and micro_batch_size and global_batch_size
                and global_batch_size % (micro_batch_size * dp)):
            problems.append(f"--global_batch_size {global_batch_size} is not divisible by "
                            f"--micro_batch_size {micro_batch_size} x data parallel size {dp}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            problems.append("--overlap_param_gather overlaps the distributed optimizer's "
                            "all-gather of the weights: add --use_distributed_optimizer")
        if self.sequence_parallel and tp == 1:
            problems.append("--sequence_parallel splits the sequence over tensor-parallel ranks: "
                            "it needs --tensor_model_parallel_size > 1")
        if seq_length is not None:
            problems += self._sequence_problems(seq_length)
        return problems

    def _model_problems(self, model: ModelShape) -> list[str]:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        problems = []
        if model.num_attention_heads % tp:
            problems.append(f"--num_attention_heads {model.num_attention_heads} is not divisible "
                            f"by --tensor_model_parallel_size {tp}")
        problems += kv_head_problems(model.num_attention_heads, model.num_attention_heads_kv,
                                     model.head_dim, tp)
        if model.num_layers % pp:
            problems.append(f"--num_layers {model.num_layers} is not divisible by "
                            f"--pipeline_model_parallel_size {pp}")
        ep = self.expert_model_parallel_size
        if ep > 1 and not model.num_experts:
            problems.append(f"--expert_model_parallel_size {ep} splits the experts of a "
                            "mixture of experts: the model has none (give --num_experts)")
        elif ep > 1 and model.num_experts % ep:
            problems.append(f"--num_experts {model.num_experts} is not divisible by "
                            f"--expert_model_parallel_size {ep} (each EP rank holds an equal "
                            "share of the experts)")
        return problems

    def _sequence_problems(self, seq_length: int) -> list[str]:
        """Whether ``seq_length`` holds the padding that context and sequence parallelism need.

        Every row (--seq_length, or with --variable_seq_lengths the longest sample rounded
        up, at most --seq_length) must split into 2 x CP chunks, and each CP rank's share
        over the TP ranks under --sequence_parallel (:attr:`sequence_multiple`).
        """
        tp, cp = self.tensor_model_parallel_size, self.context_parallel_size
        multiple = self.sequence_multiple
        if multiple == 1 or seq_length % multiple == 0:
            return []
        if cp == 1:  # sequence parallelism alone
            return [f"--sequence_parallel: --seq_length {seq_length} must be divisible by "
                    f"--tensor_model_parallel_size {tp}"]
        why = f"2 x CP = {2 * cp} chunks"
        if self.sequence_parallel:
            why += f", each CP rank's share over TP {tp} (--sequence_parallel)"
        lower = seq_length // multiple * multiple
        hint = (f"{lower} or {lower + multiple}" if lower else str(multiple))
        return [f"--context_parallel_size {cp} splits every row into {why}, so rows are "
                f"padded to a multiple of {multiple}; --seq_length {seq_length} is not one "
                f"(use {hint})"]


def kv_head_problems(heads: int, kv: int, head_dim: int, tp: int) -> list[str]:
    """What keeps ``kv`` key/value heads (of ``heads`` query heads) from splitting over TP
    ``tp``. Fewer key/value heads than TP ranks is fine when TP is a multiple of them:
    megatron-core then gives each TP rank its group's one key/value head (the weights stay
    one copy, split like any other; the query/key/value projection's output is gathered
    over TP and each rank takes its group's heads, so the gradients of the shared heads
    sum over the ranks that use them)."""
    if kv and heads % kv:
        return [f"--num_attention_heads {heads} is not divisible by --num_attention_heads_kv "
                f"{kv}"]
    if kv % tp == 0:
        return []
    if tp % kv:
        return [f"--num_attention_heads_kv {kv} and --tensor_model_parallel_size {tp}: one "
                "must divide the other (TP ranks beyond the key/value heads share them)"]
    rows = (heads + 2 * kv) * head_dim
    if rows % tp:
        return [f"the query/key/value projection's {rows} rows ({heads} + 2 x {kv} heads of "
                f"{head_dim}) do not split over --tensor_model_parallel_size {tp}"]
    return []


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
    ep: int = 1  # expert-parallel ranks (each holds its share of every MoE layer's experts)

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
                     cp: int = 1, ep: int = 1) -> Layout:
    """Initialise torch.distributed (from torchrun's env) and megatron-core's groups.

    ``cp``: context-parallel size; megatron-core's groups then reduce gradients over the
    data-parallel x context-parallel ranks (``Layout.dp`` counts data replicas only).
    ``ep``: expert-parallel size; megatron-core's expert groups (TP x EP ranks of each
    stage, expert-data-parallel over the rest) hold the experts' shares."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    problems = ParallelArgs(tp, pp, cp, expert_model_parallel_size=ep).problems(world_size)
    if problems:
        raise ConfigError("; ".join(problems))
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
            context_parallel_size=cp, expert_model_parallel_size=ep,
        )
    if not use_cuda:
        lower_gloo_loop_priority()
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
        ep=parallel_state.get_expert_model_parallel_world_size(),
    )


GLOO_LOOP_NICE_ENV = "MEGATRON_EXT_GLOO_LOOP_NICE"
GLOO_LOOP_NICE = 19
GLOO_LOOP_THREAD = "gloo_tcp_loop"


def lower_gloo_loop_priority() -> int:
    """Give this process's gloo transport threads the lowest scheduling priority (nice 19,
    or ``$MEGATRON_EXT_GLOO_LOOP_NICE``; 0 leaves them alone); the number of threads.

    Why: gloo's TCP transport waits for the sockets of its process groups in an
    event-loop thread per device (``gloo_tcp_loop``; torch makes a device per group, the
    CPU compat layer one for all, patch 10). A message that arrives before its receive is
    posted stays readable, so the loop returns from ``epoll_wait`` at once, again and again
    (about 260,000 calls a second, measured), until the thread that posts the receive runs,
    and on a busy CPU it is the spinning loop that keeps it from running. A 2-rank
    all-reduce of 16 floats on 2 cores took 0.75 ms of CPU and 1.13 ms per call; with the
    loop threads at nice 19, 0.41 ms and 0.62 ms, and beside two busy processes 0.69 ->
    0.31 ms of CPU, 1.19 -> 0.66 ms (``bench/gloo_loop_priority.py``). The loop still runs
    whenever a core has nothing better to do, and the scheduler never starves it.

    Call after making process groups (the first one starts the thread); a thread already
    lowered is lowered again, harmlessly. Linux only (a thread's own nice value,
    ``setpriority`` on its id); elsewhere nothing changes."""
    try:
        nice = int(os.environ.get(GLOO_LOOP_NICE_ENV, GLOO_LOOP_NICE))
    except ValueError:
        raise ConfigError(f"{GLOO_LOOP_NICE_ENV} must be a nice value (0 to 19), not "
                          f"{os.environ[GLOO_LOOP_NICE_ENV]!r}") from None
    if nice <= 0 or not os.path.isdir("/proc/self/task"):
        return 0
    lowered = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as handle:
                if handle.read().strip() != GLOO_LOOP_THREAD:
                    continue
            os.setpriority(os.PRIO_PROCESS, int(tid), min(nice, 19))
            lowered += 1
        except OSError:  # the thread ended meanwhile
            continue
    return lowered


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

    Whatever the worker started itself must end with it too: a save starts no process
    that could outlive it (``checkpointing.writer``).

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
