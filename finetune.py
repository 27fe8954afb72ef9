#!/usr/bin/env python3
"""Instruction finetuning on megatron-core. Launch with torchrun:

  torchrun --nproc_per_node 2 finetune.py --data_path runs/data/train ... (see --help)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_ext.cli import run_cli, setup_logging  # noqa: E402
from megatron_ext.training.arguments import build_parser, config_from_args  # noqa: E402


def main(argv=None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    setup_logging()
    from megatron_ext.parallel import shutdown
    from megatron_ext.training.trainer import Trainer

    try:
        Trainer(config).train()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
