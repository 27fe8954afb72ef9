"""Run megatron-core 0.16 on CPU with gloo: the only place that patches it.

Why: megatron-core assumes CUDA in a few dozen places; on a machine without a GPU
we still want real TP/PP/DP training, for tests and demos. Every patch applies only
when ``torch.cuda.is_available()`` is false, so nothing changes on GPUs; see
``docs/notes/megatron-core-cpu.md`` for how each was found and shown necessary.

* :func:`enable_cpu_compat` (``cpu.py``): the five patches training needs.
* :func:`skip_jit_fuser_on_cpu`: megatron-core's ``jit_fuser`` without
  ``torch.compile``, installed before megatron-core is imported.

This face imports no torch: the flag parsers and the floor below them import it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_JIT = "megatron.core.jit"


def enable_cpu_compat() -> bool:
    """Apply the training patches once if there is no CUDA device; returns whether they
    are active (``cpu.py``)."""
    from megatron_ext.compat.cpu import enable_cpu_compat as enable

    return enable()


class _NoJitFuserOnCpu(importlib.abc.MetaPathFinder):
    """Loads ``megatron.core.jit`` as it is, then, without CUDA, calls its own
    ``disable_jit_fuser()``: the functions megatron-core decorates with ``jit_fuser``
    (fused GeLU/SwiGLU/L2-norm variants) stay plain PyTorch functions.

    Why: ``jit_fuser`` is ``torch.compile``, and decorating with it imports TorchDynamo
    and Inductor: about 1.5 s of CPU in every process that imports megatron-core
    (measured: 5.8 s -> 4.3 s for ``import megatron.core``), a cost paid by each
    torchrun worker and tool, for kernels that only exist to be fused on GPUs. The
    decorated functions compute the same values eagerly; our model configurations
    switch megatron-core's fusions off on CPU anyway (``models/builder.py``).
    """

    def find_spec(self, name, path, target=None):
        if name != _JIT:
            return None
        sys.meta_path.remove(self)  # once: the next lookup finds the real module
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            import torch  # megatron-core imported it before this module

            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


def skip_jit_fuser_on_cpu() -> bool:
    """Before megatron-core is imported: its ``jit_fuser`` becomes a plain decorator
    when no CUDA device is present (:class:`_NoJitFuserOnCpu`). Returns whether the hook
    is in place (False once megatron-core is imported: too late, nothing changes)."""
    if _JIT in sys.modules:
        return False
    if not any(isinstance(finder, _NoJitFuserOnCpu) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoJitFuserOnCpu())
    return True
