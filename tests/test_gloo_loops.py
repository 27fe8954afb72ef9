"""gloo's event loops on CPU: every process group shares one gloo device, so one event-loop
thread serves them all (compat patch 10), and it runs at the lowest priority, nice 19
(megatron_ext.parallel.lower_gloo_loop_priority); every other thread is as it was.

The check runs in a session worker (tests/runs.py): a fresh batch starts with megatron-core's
groups destroyed, so ``init_distributed`` makes them anew there, as a trainer does."""

from __future__ import annotations

import json
import os

import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.parallel import GLOO_LOOP_NICE_ENV, lower_gloo_loop_priority
from tests.runs import call_job, run_many


def _nice_by_thread() -> dict[str, list[int]]:
    """{thread name: [nice value of each such thread]} of this process (Linux)."""
    found: dict[str, list[int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as handle:
                name = handle.read().strip()
            found.setdefault(name, []).append(os.getpriority(os.PRIO_PROCESS, int(tid)))
        except OSError:
            continue
    return found


def loops_after_init(out: str) -> None:
    """Worker job: megatron-core's groups made by init_distributed, then one more gloo group
    with the opt-out set; the process's groups and threads' nice values, to ``out``."""
    import torch.distributed as dist

    from megatron_ext.parallel import init_distributed

    main = os.getpriority(os.PRIO_PROCESS, 0)
    init_distributed(1, 1, 1234)
    groups = len(dist.distributed_c10d._world.pg_names)
    after_init = _nice_by_thread()
    os.environ[GLOO_LOOP_NICE_ENV] = "0"  # the worker restores its environment after a job
    group = dist.new_group([0])
    lowered = lower_gloo_loop_priority()
    after_opt_out = _nice_by_thread()
    dist.destroy_process_group(group)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"main": main, "groups": groups, "after_init": after_init, "opted_out_lowered": lowered,
                   "after_opt_out": after_opt_out}, handle)


def test_gloo_loop_threads_run_at_nice_19_and_nothing_else_changes(tmp_path):
    out = tmp_path / "threads.json"
    result = run_many(1, [call_job("loops", "tests.test_gloo_loops:loops_after_init",
                                   str(out))], tmp_path)["loops"]
    assert result.returncode == 0, result.log[-3000:]
    seen = json.loads(out.read_text())
    # the default group and megatron-core's share one device: one loop thread, at nice 19
    assert seen["groups"] > 10 and seen["after_init"]["gloo_tcp_loop"] == [19]
    others = {name: set(values) for name, values in seen["after_init"].items()
              if name != "gloo_tcp_loop"}
    assert all(values == {seen["main"]} for values in others.values()), others
    # a later group adds no thread; with the opt-out nothing is lowered
    assert seen["opted_out_lowered"] == 0
    assert seen["after_opt_out"]["gloo_tcp_loop"] == [19]


def test_a_bad_nice_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(GLOO_LOOP_NICE_ENV, "low")
    with pytest.raises(ConfigError, match=f"{GLOO_LOOP_NICE_ENV} must be a nice value"):
        lower_gloo_loop_priority()
    monkeypatch.setenv(GLOO_LOOP_NICE_ENV, "0")
    assert lower_gloo_loop_priority() == 0
