"""The Slurm executor: the experiment's training and its evaluation and export as one job.

Why one job running both: the evaluation and the export need the trained model
on a machine of the cluster, and a requeued or resubmitted job must redo only
what is missing. The script (``EXPERIMENTS_DIR/NAME/job.sbatch``) trains with
one torchrun agent per node (``megatron_ext.launch.slurm``), then runs
``sft.py --post_only`` for the experiment, which evaluates and exports only when
the training reached its last step. Resubmitting the same command (or Slurm
requeueing the job) resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from megatron_ext.launch.slurm import SlurmJob, sbatch_script, submit

if TYPE_CHECKING:
    from megatron_ext.launch.experiment import Experiment
    from megatron_ext.launch.options import SFTConfig

SCRIPT = "job.sbatch"


def job_for(config: "SFTConfig", exp: "Experiment", repo: str) -> SlurmJob:
    threads = max(1, (config.cpus_per_task or 1) // config.num_gpus)
    return SlurmJob(
        job_name=f"sft-{config.experiment}", nodes=config.num_nodes,
        processes_per_node=config.num_gpus, gpus=not config.cpu, log_dir=exp.path("logs"),
        workdir=repo, python=sys.executable, account=config.account,
        partition=config.partition, time=config.time, container_image=config.container_image,
        container_mounts=tuple(config.container_mounts), cpus_per_task=config.cpus_per_task,
        rdzv_port=config.rdzv_port,
        env={"PYTHONPATH": repo, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)})


def script_text(config: "SFTConfig", exp: "Experiment", trainer_args: list[str], repo: str,
                finetune: str, sft: str) -> str:
    """The sbatch script: training, then evaluation and export of the finished experiment."""
    import shlex

    text = sbatch_script(job_for(config, exp, repo), finetune, trainer_args)
    post = [sys.executable, sft, "--post_only", "--experiment", config.experiment,
            "--experiments_dir", os.path.abspath(config.experiments_dir)]
    return text + ("\n# evaluate on the test split and export, once training reached its "
                   "last step\n" + " ".join(shlex.quote(p) for p in post) + "\n")


def submit_experiment(config: "SFTConfig", exp: "Experiment", trainer_args: list[str],
                      repo: str, finetune: str, sft: str):
    from megatron_ext.io import write_text
    from megatron_ext.launch.recipe import Outcome

    path = exp.path(SCRIPT)
    write_text(path, script_text(config, exp, trainer_args, repo, finetune, sft))
    os.makedirs(exp.path("logs"), exist_ok=True)
    result = submit(path, wait=config.wait)
    if not config.wait:
        return Outcome(exp, "submitted",
                       f"submitted Slurm job {result.job_id} ({path}); logs in "
                       f"{exp.path('logs')}; the same command again resumes or reports the "
                       "experiment finished")
    return Outcome(exp, "ended" if result.state == "COMPLETED" else "submitted",
                   f"Slurm job {result.job_id} ended: {result.state} (logs in "
                   f"{exp.path('logs')})")
