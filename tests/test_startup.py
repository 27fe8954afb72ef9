"""megatron_ext/startup.py: heavy imports without full collections, then frozen, once.

Each check runs in a fresh interpreter: this test session has settled already (conftest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

CHECK = """
import gc
from megatron_ext import startup

full = []
gc.callbacks.append(lambda phase, info: phase == "start" and full.append(info["generation"]))
before = gc.get_threshold()

class Node:  # long-lived objects in cycles, as imported modules are
    def __init__(self, other=None):
        self.other = other or self

kept = []
with startup.heavy_imports("json"):
    assert gc.get_threshold()[:2] == before[:2], "young collections go on"
    assert gc.get_threshold()[2] == startup.NO_FULL_COLLECTION
    for _ in range(300_000):
        kept.append(Node())
    for _ in range(20_000):  # garbage cycles: the young collections reclaim them
        Node()
    young = [g for g in full if g < 2]
    assert young, "no young collection ran"
    assert 2 not in full, f"a full collection ran while importing: {full}"
    assert not startup.settled()
    assert gc.get_freeze_count() == 0
assert gc.get_threshold() == before, (gc.get_threshold(), before)
assert startup.settled()
frozen = gc.get_freeze_count()
assert frozen >= 300_000, frozen

# a later block imports plainly: no pause, no second freeze (it would keep the work's cycles)
more = [Node() for _ in range(1000)]
with startup.heavy_imports("csv"):
    assert gc.get_threshold() == before
import csv  # noqa: F401  (imported by the block)
assert gc.get_freeze_count() == frozen
gc.collect()  # the frozen objects are not looked at again
print("ok")
"""

NESTED = """
import gc
from megatron_ext import startup

before = gc.get_threshold()
with startup.heavy_imports():
    with startup.heavy_imports("json"):  # inside another block: plain
        assert gc.get_threshold()[2] == startup.NO_FULL_COLLECTION
    assert not startup.settled(), "the inner block settled the outer one"
assert startup.settled() and gc.get_threshold() == before
print("ok")
"""

FAILED_IMPORT = """
import gc
from megatron_ext import startup

before = gc.get_threshold()
try:
    with startup.heavy_imports("no_such_module_anywhere"):
        pass
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("the missing module was not reported")
assert gc.get_threshold() == before, "a failed import left full collections off"
assert startup.settled()
print("ok")
"""


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_heavy_imports_pause_full_collections_then_freeze_once():
    _run(CHECK)


def test_a_block_inside_another_or_after_a_failed_import_leaves_the_collector_as_it_was():
    _run(NESTED)
    _run(FAILED_IMPORT)


def test_the_trainers_modules_exist():
    """finetune.py imports them inside its heavy block: a renamed module must show here."""
    import importlib.util

    from megatron_ext.training.backends import TRAINER_MODULES

    for backend, modules in TRAINER_MODULES.items():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, (backend, module)
