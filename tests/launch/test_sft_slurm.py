"""``instruct/sft.py --executor slurm`` on a real single-node cluster: one command submits
the experiment as a 2-process CPU job that trains, checkpoints, evaluates and exports
(``--wait`` follows it); a job cancelled mid-run (scancel: SIGTERM, the trainer saves where
it stopped) resumes when the same command is run again; a requeued job resumes by itself;
each on the uninterrupted run's loss curve."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megatron_ext.launch.slurm import FINISHED_STATES, cancel, job_state, requeue, wait_for
from megatron_ext.parallel import free_port
from tests.launch.test_sft_local import dataset, sft_args
from tests.runs import child_env, train_metrics
from tests.training.test_parallel import assert_same_curve
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 12
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def slurm_experiments(slurm_cluster, tmp_path_factory, sp_model):
    from tests.tools.conftest import make_hf_model

    root = tmp_path_factory.mktemp("sft_slurm")
    base = make_hf_model(root / "base", sp_model, num_hidden_layers=2)
    return root, base, dataset(root / "data")


def command(root: Path, base: Path, data: Path, name: str, *extra: str) -> list[str]:
    return sft_args(name, base, data, root / "experiments", "--executor", "slurm", "--cpu",
                    "--cpus_per_task", "2", "--max_steps", str(STEPS), "--rdzv_port",
                    str(free_port()), *extra)


def launch(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=child_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT + 120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def job_log(experiment: Path) -> str:
    return "".join(path.read_text(errors="replace")
                   for path in sorted((experiment / "logs").glob("sft-*")))


def wait_for_steps(experiment: Path, job_id: str, count: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        try:
            if len(train_metrics(experiment / "checkpoints")) >= count:
                return
        except (FileNotFoundError, ValueError):
            pass
        state = job_state(job_id)
        if state in FINISHED_STATES or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is {state} before {count} steps:\n"
                        f"{job_log(experiment)[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(slurm_experiments):
    root, base, data = slurm_experiments
    return launch(command(root, base, data, "straight", "--wait")), root / "experiments"


def test_wait_runs_training_evaluation_and_export_as_one_job(straight):
    result, experiments = straight
    experiment = experiments / "straight"
    assert "is finished: 12 steps" in result.stdout, result.stdout[-3000:]
    record = json.loads((experiment / "experiment.json").read_text())
    assert record["status"] == "finished" and record["results"]["iteration"] == STEPS
    script = (experiment / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "--post_only" in script
    assert "--gpus-per-node" not in script  # --cpu
    assert (experiment / "hf" / "config.json").exists()
    assert json.loads((experiment / "eval" / "test.json").read_text())["records"] == 6
    assert [r["iteration"] for r in train_metrics(experiment)] == list(range(1, STEPS + 1))
    assert "parallel: world 2" in job_log(experiment)


def test_scancel_then_the_same_command_resumes(slurm_experiments, straight):
    root, base, data = slurm_experiments
    args = command(root, base, data, "cancelled")
    submitted = launch(args)
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    experiment = root / "experiments" / "cancelled"
    wait_for_steps(experiment, job_id, 3)
    cancel(job_id)
    assert wait_for(job_id, {"CANCELLED"}, timeout=120) == "CANCELLED"
    log = job_log(experiment)
    stopped = re.search(r"stopping after iteration (\d+) \(signal 15\)", log)
    assert stopped, log[-4000:]  # SIGTERM: the trainer saved where it stopped
    at = int(stopped.group(1))
    assert int((experiment / "checkpoints" / "latest_checkpointed_iteration.txt")
               .read_text()) == at < STEPS
    again = launch(args + ["--wait"])  # the same command: a new job that resumes
    assert "is finished: 12 steps" in again.stdout, again.stdout[-3000:]
    assert f"resuming at iteration {at}" in job_log(experiment)
    assert_same_curve(train_metrics(experiment), train_metrics(straight[1] / "straight"))


def test_requeued_job_resumes_and_finishes_the_experiment(slurm_cluster, slurm_experiments,
                                                          straight):
    root, base, data = slurm_experiments
    submitted = launch(command(root, base, data, "requeued"))
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    experiment = root / "experiments" / "requeued"
    wait_for_steps(experiment, job_id, 3)
    requeue(job_id)
    wait_for(job_id, {"PENDING"}, timeout=120)
    # Slurm holds a requeued job for about two minutes (its BeginTime): start it now
    slurm_cluster.wait_idle()
    slurm_cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    assert wait_for(job_id, {"COMPLETED"}, timeout=JOB_TIMEOUT) == "COMPLETED"
    record = json.loads((experiment / "experiment.json").read_text())
    assert record["status"] == "finished", job_log(experiment)[-4000:]
    assert "resuming at iteration" in job_log(experiment)
    assert_same_curve(train_metrics(experiment), train_metrics(straight[1] / "straight"))
    rerun = launch(command(root, base, data, "requeued"))
    assert "is already finished" in rerun.stdout
