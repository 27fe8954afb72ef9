#!/usr/bin/env python3
"""Instruction finetuning on megatron-core. Launch with torchrun:

  torchrun --nproc_per_node 2 finetune.py --data_path runs/data/train ... (see --help)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_ext.cli import run_cli, setup_logging  # noqa: E402
from megatron_ext.parallel import exit_when_orphaned  # noqa: E402 - light: no torch
from megatron_ext.startup import heavy_imports  # noqa: E402
from megatron_ext.training.arguments import parse_config  # noqa: E402


def main(argv=None) -> int:
    # first: a worker whose torchrun agent dies while it still imports must exit too
    exit_when_orphaned()
    config = parse_config(argv)  # flags checked before torch and megatron-core are imported
    setup_logging()
    # imported only now, for the same reason: a bad flag must not cost their import; and
    # the quick way (megatron_ext/startup.py: a fifth less of a rank's start-up), with
    # what the plan's backend will import
    with heavy_imports():
        import torch

        from megatron_ext.parallel import shutdown
        from megatron_ext.training.backends import import_trainer, make_trainer
        from megatron_ext.training.plan import resolve

        # what to load, from where, with which backend, model and adapters: settled once,
        # then trained (it reads small files only: metadata and configs, nothing whose
        # garbage the freeze would keep)
        plan = resolve(config, cuda=torch.cuda.is_available())
        import_trainer(plan)
    try:
        make_trainer(plan).train()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
