"""Run megatron-core 0.16 on CPU with gloo: the only place that patches it.

Why: megatron-core assumes CUDA in a few dozen places; on a machine without a GPU
we still want real TP/PP/DP training, for tests and demos. Every patch applies only
when ``torch.cuda.is_available()`` is false, so nothing changes on GPUs; see
``docs/notes/megatron-core-cpu.md`` for how each was found and shown necessary.

* :func:`enable_cpu_compat` (``cpu.py``): the patches training needs (ten, listed there).
* :func:`skip_jit_fuser_on_cpu`: megatron-core's ``jit_fuser`` without
  ``torch.compile``, and its optional ``wandb`` imports skipped, installed before
  megatron-core is imported.

This face imports no torch: the flag parsers and the floor below them import it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_JIT = "megatron.core.jit"
_WANDB_USERS = ("megatron.core.timers", "megatron.core.inference.contexts.dynamic_context",
                "megatron.core.inference.engines.dynamic_engine")
"""The megatron-core modules that import wandb, optionally (``try: import wandb except
ImportError: wandb = None``), for features we never use: the Timers' wandb writer and the
dynamic inference engine's statistics."""


def enable_cpu_compat() -> bool:
    """Apply the training patches once if there is no CUDA device; returns whether they
    are active (``cpu.py``)."""
    from megatron_ext.compat.cpu import enable_cpu_compat as enable

    return enable()


def _on_cpu() -> bool:
    import torch  # megatron-core imported it before any module hooked here

    return not torch.cuda.is_available()


def _after_jit(module) -> None:
    """``megatron.core.jit``: call its own ``disable_jit_fuser()`` without CUDA."""
    if _on_cpu():
        module.disable_jit_fuser()


class _CpuImportHooks(importlib.abc.MetaPathFinder):
    """Wraps the execution of a few megatron-core modules, once each, without CUDA:

    * ``megatron.core.jit``: loaded as it is, then its own ``disable_jit_fuser()`` is
      called, so the functions megatron-core decorates with ``jit_fuser`` (fused
      GeLU/SwiGLU/L2-norm variants) stay plain PyTorch functions. Why: ``jit_fuser`` is
      ``torch.compile``, and decorating with it imports TorchDynamo and Inductor: about
      1.5 s of CPU in every process that imports megatron-core (measured: 5.8 s -> 4.3 s
      for ``import megatron.core``), a cost paid by each torchrun worker and tool, for
      kernels that only exist to be fused on GPUs. The decorated functions compute the
      same values eagerly; our model configurations switch megatron-core's fusions off on
      CPU anyway (``models/builder.py``).
    * :data:`_WANDB_USERS`: executed with ``wandb`` unimportable (when nothing imported it
      yet), so they take their own ``wandb = None`` branch. Why: importing wandb (and the
      pydantic models of its settings) costs about 0.5 s of CPU in every such process
      (measured: 2.9 s -> 2.4 s for megatron-core with its GPT model and checkpointing),
      for two features we never use; our own ``--wandb_project`` logging imports wandb
      itself, unaffected.
    """

    def __init__(self):
        self.pending = {_JIT, *_WANDB_USERS}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        if name == _JIT:
            def exec_module(module) -> None:
                execute(module)
                _after_jit(module)
        else:
            def exec_module(module) -> None:
                if "wandb" in sys.modules or not _on_cpu():
                    execute(module)
                    return
                sys.modules["wandb"] = None  # "import wandb" raises ImportError
                try:
                    execute(module)
                finally:
                    if sys.modules.get("wandb", 0) is None:
                        del sys.modules["wandb"]
        spec.loader.exec_module = exec_module
        return spec


def skip_jit_fuser_on_cpu() -> bool:
    """Before megatron-core is imported: its ``jit_fuser`` becomes a plain decorator and
    its optional wandb imports are skipped when no CUDA device is present
    (:class:`_CpuImportHooks`). Returns whether the hooks are in place (False once
    megatron-core is imported: too late, nothing changes)."""
    if _JIT in sys.modules:
        return False
    if not any(isinstance(finder, _CpuImportHooks) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CpuImportHooks())
    return True
