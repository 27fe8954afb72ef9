"""How megatron-core's checkpoint writer runs for our saves: in the saving process.

Why a room: every ``dist_checkpointing.save`` (the trainer's checkpoints in ``dist``,
the converters' in ``unsharded.save_dist_from_tensors``) goes through megatron-core's
``FileSystemWriterAsync``, which is built for *asynchronous* saves: its writing function
runs in a forked copy of the trainer, forks again, one process per file, and hands the
results back through a ``multiprocessing`` Manager queue. The Manager is a spawned
helper process: it re-imports the program (2-3 s of CPU in every process that saves),
dies with the SIGTERM that asks a trainer to save, and outlives a parent killed with
SIGKILL. Each fork copies the page tables of the whole process (tens of milliseconds
for a small trainer, more for a big one), for every file of every save.

Our saves are synchronous: the writing function runs in the saving process, which
waits for it. So :func:`keep_writes_in_process` gives it an in-process results queue
and writes the files from threads (the tensors are already on the host; writing is I/O,
which releases the GIL). The files and the results are those of megatron-core's own
``write_preloaded_data``, called as its forked processes would call it. Measured on a
2-layer model on CPU: 0.13 -> 0.03 s of CPU a save, and no helper process at all. Both
save paths call it first.
"""

from __future__ import annotations

import queue
import threading


def _write_in_threads(transform_list, use_msc: bool, rank: int, write_buckets,
                      results_queue) -> None:
    """``FileSystemWriterAsync.write_preloaded_data_multiproc`` with threads for processes:
    one thread a file; ``{thread index: write results}``, or the first exception, into
    ``results_queue`` as megatron-core's version puts it there."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    local_results, count = queue.Queue(), queue.Queue()
    threads = []
    for index, bucket in enumerate(write_buckets):
        count.put(index)  # each writer takes one and marks it done, as in megatron-core
        threads.append(threading.Thread(
            target=FileSystemWriterAsync.write_preloaded_data,
            args=(transform_list, index, bucket, local_results, count, True),
            kwargs={"use_msc": True} if use_msc else {}, name=f"checkpoint-writer-{index}"))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results: dict | Exception = {}
    while not local_results.empty():
        index, written = local_results.get()
        if isinstance(written, Exception):
            results = RuntimeError(f"checkpoint writer {index} of rank {rank} failed: "
                                   f"{written}")
            results.__cause__ = written
            break
        results[index] = written
    results_queue.put(results)


def keep_writes_in_process() -> None:
    """Make megatron-core's checkpoint writer write and report in this process (once).

    Only for synchronous ``dist_checkpointing.save`` calls, the only kind we make: an
    asynchronous save runs the writing function in a forked process, whose results an
    in-process queue would never see (megatron-core's retrieval would then fail with
    "results_queue should not be empty", not write a partial checkpoint silently).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    if getattr(filesystem_async, "_results_queue", False) is None:  # False: not this version
        filesystem_async._results_queue = queue.Queue()
    if hasattr(writer, "write_preloaded_data_multiproc"):
        writer.write_preloaded_data_multiproc = staticmethod(_write_in_threads)
