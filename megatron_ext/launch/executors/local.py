"""The local executor: ``torchrun`` on this node (every node, with ``--node_rank``), its
output shown and kept in ``logs/train-TIME.log``; the launcher waits for it.

A SIGTERM or Ctrl-C to the launcher reaches the trainer, which saves and stops;
rerunning the same command resumes from that checkpoint.
"""

from __future__ import annotations

import os

from megatron_ext.cli import ERROR_FILE
from megatron_ext.launch.executors.base import (
    STOPPED,
    TRAINED,
    Executor,
    Launch,
    Ran,
    TrainingFailed,
    refused,
)
from megatron_ext.launch.local import child_env, run_logged, stamp, torchrun_command


class LocalExecutor(Executor):
    name = "local"
    resume = "rerun the same command to resume"
    settings = ("node_rank", "master_addr", "master_port")

    def unused_settings(self, config) -> dict[str, str]:
        unused = super().unused_settings(config)
        if config.num_nodes == 1:  # torchrun --standalone picks its own address and port
            unused.update(dict.fromkeys(self.settings, "--num_nodes > 1"))
        return unused

    def commands(self, launch: Launch) -> list[list[str]]:
        c = launch.config
        return [torchrun_command(launch.script, launch.args, c.num_gpus, c.num_nodes,
                                 c.node_rank, c.master_addr, c.master_port)]

    def run(self, launch: Launch) -> Ran:
        config, exp = launch.config, launch.experiment
        log = exp.path("logs", f"train-{stamp()}.log")
        [command] = self.commands(launch)
        # a rank's UserError comes back in this file: said once, here, without torchrun's
        # traceback (cli.run_cli)
        report = log.removesuffix(".log") + ".error"
        env = dict(child_env(config.num_gpus, launch.repo), **{ERROR_FILE: report})
        finished = run_logged(command, log, env, launch.repo, quiet_after=report,
                              steps_bar=config.progress)
        if finished.code != 0 and os.path.exists(report):
            raise TrainingFailed(refused(report, log))
        latest = exp.latest_iteration()

        def stopped(why: str) -> Ran:
            return Ran(STOPPED, f"training stopped at iteration {latest or 0} of "
                                f"{exp.train_iters} {why}; {self.resume}")

        if finished.signalled:  # the trainer saved and stopped (torchrun exits non-zero then)
            return stopped("by a signal")
        if finished.code != 0:
            raise TrainingFailed(f"training failed (exit {finished.code}); "
                                 f"{self.follow(launch, log)}. Fix the cause and rerun the "
                                 "same command: it resumes from the latest checkpoint")
        if config.node_rank != 0:  # evaluation and export are the first node's
            return Ran(STOPPED, f"node {config.node_rank}: training done")
        if latest is None or latest < exp.train_iters:
            return stopped("(a signal or --exit conditions)")
        return Ran(TRAINED)

    def follow(self, launch: Launch, handle: str) -> str:
        return f"the log is {handle}"


EXECUTOR = LocalExecutor
