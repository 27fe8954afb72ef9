"""megatron_ext.parallel.lower_gloo_loop_priority: on CPU, the event-loop thread of each gloo
process group runs at the lowest priority (nice 19), every other thread as it was.

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
    with the opt-out set; the threads' nice values before and after, to ``out``."""
    import torch.distributed as dist

    from megatron_ext.parallel import init_distributed

    main = os.getpriority(os.PRIO_PROCESS, 0)
    init_distributed(1, 1, 1234)
    after_init = _nice_by_thread()
    os.environ[GLOO_LOOP_NICE_ENV] = "0"  # the worker restores its environment after a job
    group = dist.new_group([0])
    lowered = lower_gloo_loop_priority()
    after_opt_out = _nice_by_thread()
    dist.destroy_process_group(group)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"main": main, "after_init": after_init, "opted_out_lowered": lowered,
                   "after_opt_out": after_opt_out}, handle)


def test_gloo_loop_threads_run_at_nice_19_and_nothing_else_changes(tmp_path):
    out = tmp_path / "threads.json"
    result = run_many(1, [call_job("loops", "tests.test_gloo_loops:loops_after_init",
                                   str(out))], tmp_path)["loops"]
    assert result.returncode == 0, result.log[-3000:]
    seen = json.loads(out.read_text())
    loops = seen["after_init"]["gloo_tcp_loop"]
    assert len(loops) > 1 and set(loops) == {19}  # the default group's and megatron-core's
    others = {name: set(values) for name, values in seen["after_init"].items()
              if name != "gloo_tcp_loop"}
    assert all(values == {seen["main"]} for values in others.values()), others
    # with the opt-out, the new group's thread keeps the process's priority
    assert seen["opted_out_lowered"] == 0
    assert sorted(seen["after_opt_out"]["gloo_tcp_loop"]) == sorted(loops + [seen["main"]])


def test_a_bad_nice_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(GLOO_LOOP_NICE_ENV, "low")
    with pytest.raises(ConfigError, match=f"{GLOO_LOOP_NICE_ENV} must be a nice value"):
        lower_gloo_loop_priority()
    monkeypatch.setenv(GLOO_LOOP_NICE_ENV, "0")
    assert lower_gloo_loop_priority() == 0
