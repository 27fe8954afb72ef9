"""The Slurm executor: the experiment's training and its evaluation and export as one job.

Why one job running both: the evaluation and the export need the trained model
on a machine of the cluster, and a requeued or resubmitted job must redo only
what is missing. The script (``EXPERIMENTS_DIR/NAME/job.sbatch``) trains with
one torchrun agent per node (``megatron_ext.launch.slurm``), then runs the
launch's post command (``sft.py --post_only`` for the experiment), which
evaluates and exports only when the training reached its last step. Slurm
requeueing the job (preemption, ``scontrol requeue``) or resubmitting the same
command resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys

from megatron_ext.io import write_text
from megatron_ext.launch.executors.base import ENDED, SUBMITTED, Executor, Launch, Ran
from megatron_ext.launch.slurm import SlurmJob, sbatch_script, submit

SCRIPT = "job.sbatch"


def job_for(launch: Launch) -> SlurmJob:
    config, exp, repo = launch.config, launch.experiment, launch.repo
    threads = max(1, (config.cpus_per_task or 1) // config.num_gpus)
    return SlurmJob(
        job_name=f"sft-{config.experiment}", nodes=config.num_nodes,
        processes_per_node=config.num_gpus, gpus=not config.cpu, log_dir=exp.path("logs"),
        workdir=repo, python=sys.executable, account=config.account,
        partition=config.partition, time=config.time, container_image=config.container_image,
        container_mounts=tuple(config.container_mounts), cpus_per_task=config.cpus_per_task,
        rdzv_port=config.rdzv_port,
        env={"PYTHONPATH": repo, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)})


def script_text(launch: Launch) -> str:
    """The sbatch script: training, then evaluation and export of the finished experiment."""
    text = sbatch_script(job_for(launch), launch.script, launch.args)
    return text + ("\n# evaluate on the test split and export, once training reached its "
                   "last step\n" + " ".join(shlex.quote(p) for p in launch.post_command)
                   + "\n")


class SlurmExecutor(Executor):
    name = "slurm"
    resume = "the same command again resumes or reports the experiment finished"
    settings = ("account", "partition", "time", "container_image", "container_mounts", "wait",
                "cpu", "cpus_per_task", "rdzv_port")

    def commands(self, launch: Launch) -> list[list[str]]:
        c = launch.config
        return [["sbatch", launch.experiment.path(SCRIPT)],
                ["srun", f"--nodes={c.num_nodes}", "--ntasks-per-node=1", sys.executable, "-m",
                 "torch.distributed.run", f"--nnodes={c.num_nodes}",
                 f"--nproc_per_node={c.num_gpus}", launch.script, *launch.args]]

    def run(self, launch: Launch) -> Ran:
        exp = launch.experiment
        path = exp.path(SCRIPT)
        write_text(path, script_text(launch))
        os.makedirs(exp.path("logs"), exist_ok=True)
        result = submit(path, wait=launch.config.wait)
        if not launch.config.wait:
            return Ran(SUBMITTED, f"submitted Slurm job {result.job_id} ({path}); "
                                  f"{self.follow(launch, result.job_id)}; {self.resume}")
        return Ran(ENDED if result.state == "COMPLETED" else SUBMITTED,
                   f"Slurm job {result.job_id} ended: {result.state} "
                   f"({self.follow(launch, result.job_id)})")

    def follow(self, launch: Launch, handle: str) -> str:
        return f"logs in {launch.experiment.path('logs')}"


EXECUTOR = SlurmExecutor
