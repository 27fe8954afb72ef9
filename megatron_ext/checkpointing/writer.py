"""megatron-core's checkpoint-writer helper process, started by us so that it behaves.

Why a room: every ``dist_checkpointing.save`` (the trainer's checkpoints in ``dist``,
the converters' in ``unsharded.save_dist_from_tensors``) writes through a
``multiprocessing`` Manager process that megatron-core starts at the first save. Left
to megatron-core, it dies with the SIGTERM that asks a trainer to save, and outlives a
parent killed with SIGKILL. Both save paths call :func:`start_checkpoint_writer` first.
"""

from __future__ import annotations

from megatron_ext.parallel import die_with_parent


def start_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint-writer helper process now, deaf to SIGTERM.

    Why: ``dist_checkpointing`` writes through a ``multiprocessing`` Manager process,
    started at the first save, in the worker's process group. The SIGTERM that asks the
    trainer to save and stop (Slurm signals every process of the step; torchrun
    forwards it to each worker's group) would kill that helper too, and the save that the
    signal asked for would fail with a broken pipe. Started with SIGTERM ignored, the
    helper inherits the ignore. It ends with its parent however the parent ends: a
    normal exit shuts it down (multiprocessing's exit hook), and it asks the kernel for
    SIGKILL when the parent dies (``os._exit`` of an orphaned worker, ``kill -9``),
    which would otherwise leave it and multiprocessing's resource tracker running for
    good. Call from the main thread (the parent-death signal follows the thread that
    started the helper).
    """
    import multiprocessing
    import signal
    import threading
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", False)  # False: not this version's
    if queue is not None and queue is not False:
        return  # running: a later save must not touch the trainer's SIGTERM handler
    if threading.current_thread() is not threading.main_thread():
        return  # signals and the parent-death signal belong to the main thread
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if queue is None:
            # megatron-core's own helper (_get_write_results_queue), started with our
            # initializer: the queue is what it caches, and it holds the manager alive
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent)
            filesystem_async._results_queue = manager.Queue()
        filesystem_async._get_write_results_queue()
    finally:
        signal.signal(signal.SIGTERM, previous)
