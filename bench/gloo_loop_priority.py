#!/usr/bin/env python3
"""gloo's event-loop threads at nice 19 (``megatron_ext.parallel.lower_gloo_loop_priority``)
against the same threads left as they are: CPU and wall time of a 2-rank all-reduce.

What it does: ``torchrun --nproc_per_node 2`` runs this file as a worker that makes a gloo
process group and megatron-core-like extra groups (``--groups``), then times ``--ops``
all-reduces of 16 floats, round-robin over the groups; once with
``MEGATRON_EXT_GLOO_LOOP_NICE=0`` (baseline) and once with the default (19), alternately
``--repeat`` times, each case also beside ``--busy`` busy-looping processes (a shared or
oversubscribed machine: the test suite's case). It prints, per case, the median CPU time
(all threads of a rank) and wall time per all-reduce, and the ratios nice 19 / baseline.

Why: a message that arrives before its receive is posted keeps the socket readable, and the
loop thread returns from ``epoll_wait`` at once, over and over, competing for the CPU with
the very thread that would post the receive.

  python bench/gloo_loop_priority.py                  # ~1 minute on 2 cores
  python bench/gloo_loop_priority.py --ops 5000 --repeat 5 --busy 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(ops: int, groups: int, out: str) -> None:
    """One rank: groups, the priority change (unless opted out), then the timed ops."""
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    from megatron_ext.parallel import lower_gloo_loop_priority

    dist.init_process_group("gloo")
    extra = [dist.new_group([0, 1]) for _ in range(groups)]
    lower_gloo_loop_priority()
    tensor = torch.ones(16)
    for group in extra:
        dist.all_reduce(tensor, group=group)
    dist.barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(ops):
        dist.all_reduce(tensor, group=extra[index % len(extra)] if extra else None)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"cpu_ms": 1e3 * cpu / ops, "wall_ms": 1e3 * wall / ops}, handle)
    dist.destroy_process_group()


def run(nice: int, ops: int, groups: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_EXT_GLOO_LOOP_NICE=str(nice))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", os.path.abspath(__file__), "--worker", str(ops),
                        str(groups), out], env=env, check=True, capture_output=True)
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=3000, help="all-reduces per run")
    parser.add_argument("--groups", type=int, default=20,
                        help="extra process groups, as megatron-core makes (~20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case")
    parser.add_argument("--busy", type=int, default=2,
                        help="busy-looping processes beside the contended case")
    args = parser.parse_args()
    for label, busy in (("idle machine", 0), (f"beside {args.busy} busy processes", args.busy)):
        results: dict[int, list[dict]] = {0: [], 19: []}
        others = busy_loops(busy)
        try:
            for _ in range(args.repeat):
                for nice in (0, 19):  # alternately: the machine's speed drifts
                    results[nice].append(run(nice, args.ops, args.groups))
        finally:
            for process in others:
                process.kill()
                process.wait()
        median = {nice: {key: statistics.median(r[key] for r in runs)
                         for key in ("cpu_ms", "wall_ms")} for nice, runs in results.items()}
        print(f"{label}: per 2-rank all-reduce (rank 0, median of {args.repeat})")
        for nice, name in ((0, "baseline (loop threads as they are)"), (19, "loop threads at nice 19")):
            print(f"  {name:36s} CPU {median[nice]['cpu_ms']:.3f} ms  wall "
                  f"{median[nice]['wall_ms']:.3f} ms")
        print(f"  ratio nice 19 / baseline: CPU {median[19]['cpu_ms'] / median[0]['cpu_ms']:.2f}"
              f"  wall {median[19]['wall_ms'] / median[0]['wall_ms']:.2f}")


if __name__ == "__main__":
    main()
