"""``instruct/sft.py --executor slurm`` on a real single-node cluster: one command submits
the experiment as a 2-process CPU job that trains, checkpoints, evaluates and exports
(``--wait`` follows it); a requeued job resumes by itself, and the same job cancelled
mid-run (scancel: SIGTERM, the trainer saves where it stopped) resumes when the same
command is run again, on the uninterrupted run's loss curve."""

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
    # the job's post step evaluated the pretrained base too: the summary compares them
    assert json.loads((experiment / "eval" / "baseline.json").read_text())["records"] == 6
    assert "pretrained" in result.stdout and "finetuned" in result.stdout
    assert [r["iteration"] for r in train_metrics(experiment)] == list(range(1, STEPS + 1))
    assert "parallel: world 2" in job_log(experiment)


def test_requeued_then_cancelled_job_resumes_each_time_on_the_straight_curve(
        slurm_cluster, slurm_experiments, straight):
    """One experiment interrupted twice: a requeued job (SIGTERM, saved, pending again)
    resumes by itself; the same job cancelled (scancel: SIGTERM, saved) resumes when the
    same command is run again; it finishes on the uninterrupted run's loss curve, and a
    further run of the command finds it finished."""
    root, base, data = slurm_experiments
    args = command(root, base, data, "interrupted", "--no_baseline")
    submitted = launch(args)
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    experiment = root / "experiments" / "interrupted"
    wait_for_steps(experiment, job_id, 3)
    requeue(job_id)
    wait_for(job_id, {"PENDING"}, timeout=120)
    # Slurm holds a requeued job for about two minutes (its BeginTime): start it now
    slurm_cluster.wait_idle()
    slurm_cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    resumed = int((experiment / "checkpoints" / "latest_checkpointed_iteration.txt")
                  .read_text())
    wait_for_steps(experiment, job_id, resumed + 2)  # the requeued job trains on by itself
    assert f"resuming at iteration {resumed}" in job_log(experiment), job_log(experiment)[-4000:]
    cancel(job_id)
    assert wait_for(job_id, {"CANCELLED"}, timeout=120) == "CANCELLED"
    stopped = re.findall(r"stopping after iteration (\d+) \(signal 15\)", job_log(experiment))
    assert stopped, job_log(experiment)[-4000:]  # SIGTERM: the trainer saved where it stopped
    at = int(stopped[-1])
    assert int((experiment / "checkpoints" / "latest_checkpointed_iteration.txt")
               .read_text()) == at < STEPS and at > resumed
    again = launch(args + ["--wait"])  # the same command: a new job that resumes
    assert "is finished: 12 steps" in again.stdout, again.stdout[-3000:]
    assert f"resuming at iteration {at}" in job_log(experiment)
    record = json.loads((experiment / "experiment.json").read_text())
    assert record["status"] == "finished"
    assert "--no_baseline" in (experiment / "job.sbatch").read_text()  # kept by the job
    assert not (experiment / "eval" / "baseline.json").exists()
    assert_same_curve(train_metrics(experiment), train_metrics(straight[1] / "straight"))
    rerun = launch(args)
    assert "is already finished" in rerun.stdout
