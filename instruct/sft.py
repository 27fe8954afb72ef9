#!/usr/bin/env python3
"""One command from a dataset folder and a base model to a finetuned model.

Tokenizes the dataset folder once (a cache keyed by content), computes the
steps from --epochs, trains with torchrun here (--executor local) or as a
Slurm job (--executor slurm), evaluates on the test split and exports the
Hugging Face model (and, with --peft, the PEFT adapter), all in
EXPERIMENTS_DIR/NAME. The same command again resumes the experiment, or says
that it is finished.

examples:
  # LoRA on a local Hugging Face model, 2 processes on this machine, 2 epochs
  python instruct/sft.py -E smol-lora --hf_model_id SmolLM2-135M-Instruct \\
      --dataset_path data/sample -G 2 --peft lora --epochs 2 -g 16 -m 4 --seq_length 512

  # full finetuning on a Slurm cluster: 2 nodes x 8 GPUs, TP 4, in a container
  python instruct/sft.py -E llama-sft --hf_model_id meta-llama/Llama-3.1-8B-Instruct \\
      --dataset_path /data/sft --executor slurm -N 2 -G 8 -T 4 -g 128 -m 2 \\
      -a my_account -p gpu --time 04:00:00 -i nvcr.io/nvidia/pytorch:25.01-py3 --bf16

  # what would it do?
  python instruct/sft.py -E smol-lora ... --dry_run
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.launch.options import SFTConfig  # noqa: E402
from megatron_ext.parallel import ParallelArgs  # noqa: E402
from megatron_ext.peft.config import PeftArgs  # noqa: E402


def build_parser() -> ConfigParser:
    parser = ConfigParser(prog="sft.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 1)[1]
                          + "\nEvery flag may also be spelled with - for _.")
    parser.add_config(SFTConfig, "experiment")
    parser.add_config(ParallelArgs, "parallel layout")
    parser.add_config(PeftArgs, "parameter-efficient finetuning (LoRA, DoRA)")
    parser.add_argument("--post_only", action="store_true",
                        help="with -E NAME only: evaluate and export the trained experiment "
                             "(the last step of its Slurm job)")
    return parser


def _post_only(argv) -> int:
    """``--post_only -E NAME [--experiments_dir DIR] [--no_baseline] [--export WHAT]
    [--export_gguf TYPE]``:
    evaluate and export the experiment with the settings it was made with (the last step of
    a Slurm job)."""
    import argparse
    import dataclasses

    from megatron_ext.checkpointing.options import GGUF_OUTTYPES
    from megatron_ext.launch.options import EXPORTS

    parser = argparse.ArgumentParser(prog="sft.py --post_only")
    parser.add_argument("--post_only", action="store_true")
    parser.add_argument("--experiment", "-E", required=True)
    parser.add_argument("--experiments_dir", default="experiments")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--export", choices=EXPORTS, default="both")
    parser.add_argument("--export_gguf", choices=GGUF_OUTTYPES, default=None)
    args, _ = parser.parse_known_args(argv)
    setup_logging()
    from megatron_ext.launch.recipe import config_of_experiment, run_sft

    config = dataclasses.replace(config_of_experiment(args.experiments_dir, args.experiment),
                                 baseline=not args.no_baseline, export=args.export,
                                 export_gguf=args.export_gguf)
    outcome = run_sft(config, post_only=True)
    print(outcome.message, flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--post_only" in argv:
        return _post_only(argv)
    args = build_parser().parse_args(argv)
    config = build_config(SFTConfig, args)
    setup_logging()
    from megatron_ext.launch.recipe import run_sft

    outcome = run_sft(config)
    print(outcome.message, flush=True)
    return 0


def console_main() -> None:
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
