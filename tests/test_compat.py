"""The CPU compatibility layer's import-time part (``megatron_ext/compat/__init__.py``)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_megatron_core_on_cpu_skips_torch_compile_and_its_import():
    """``megatron_ext.compat.skip_jit_fuser_on_cpu`` (installed by ``parallel.py``):
    megatron-core's ``jit_fuser`` is a plain decorator without CUDA, so TorchDynamo and
    Inductor are never imported, nor is wandb by megatron-core (our own logging still
    imports it); megatron-core imported first keeps its own."""
    code = ("import sys\n"
            "import megatron_ext.parallel\n"
            "import megatron.core, megatron.core.jit as jit, megatron.core.timers as timers\n"
            "import megatron.core.inference.contexts.dynamic_context as context\n"
            "print(jit.jit_fuser is jit.noop_decorator, 'torch._inductor' in sys.modules)\n"
            "print('wandb' in sys.modules, timers.wandb, context.HAVE_WANDB)\n"
            "import wandb\n"  # our own logging still imports it
            "print(wandb.__name__, hasattr(wandb, 'init'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "None", "False", "wandb", "True"]
