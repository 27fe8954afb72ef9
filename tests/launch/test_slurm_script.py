"""The generated sbatch scripts, compared exactly with golden files, and the checks of
:class:`SlurmJob` and the Slurm commands that need no cluster.

To rewrite the golden files after an intended change: ``UPDATE_GOLDEN=1 pytest
tests/launch/test_slurm_script.py``, then read the diff."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_ext.errors import ConfigError, UserError
from megatron_ext.launch.slurm import (
    SlurmError,
    SlurmJob,
    SlurmNotFound,
    JobInfo,
    job_info,
    job_state,
    sbatch_script,
    submit,
    time_limit_seconds,
    wait_for,
    write_script,
)

GOLDEN = Path(__file__).parent / "golden"
ARGS = ["--data_path", "/data/chat/train", "--tokenizer_type", "SentencePieceTokenizer",
        "--vocab_file", "/models/llama2/tokenizer.model", "--model_name", "llama2",
        "--load", "/ckpt/exp one", "--save", "/ckpt/exp one", "--train_iters", "1000",
        "--save_interval", "100", "--lr", "2e-5", "--system_prompt", "it's $HOME; `x`"]


def gpu_job(**changes) -> SlurmJob:
    fields = dict(
        job_name="sft-llama2", nodes=2, processes_per_node=8, gpus=True, account="proj42",
        partition="gpu", time="04:00:00", container_image="nvcr.io#nvidia/pytorch:25.01-py3",
        container_mounts=("/data:/data", "/ckpt:/ckpt", "/models:/models:ro"),
        log_dir="experiments/sft-llama2/logs", workdir="/home/me/megatron-sft",
        python="python", env={"OMP_NUM_THREADS": "8", "NCCL_DEBUG": "WARN",
                              "HF_HOME": "/data/hf cache"})
    fields.update(changes)
    return SlurmJob(**fields)


def cpu_job(**changes) -> SlurmJob:
    fields = dict(job_name="sft-tiny", nodes=1, processes_per_node=2, gpus=False,
                  log_dir="/scratch/logs", workdir="/home/me/megatron-sft",
                  python="/home/me/megatron-sft/.venv/bin/python", env={},
                  signal_seconds=50, rdzv_port=29611)
    fields.update(changes)
    return SlurmJob(**fields)


CASES = {
    "gpu_2node_container.sbatch": (gpu_job, "finetune.py", ARGS),
    "gpu_2node.sbatch": (lambda: gpu_job(container_image=None, container_mounts=()),
                         "finetune.py", ARGS),
    "cpu_1node.sbatch": (cpu_job, "finetune.py", ["--train_iters", "40", "--save", "/s/run"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_script_matches_golden_file(name):
    make_job, script, args = CASES[name]
    text = sbatch_script(make_job(), script, args)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: rerun with UPDATE_GOLDEN=1 if intended"


def test_script_is_deterministic_and_valid_bash():
    first = sbatch_script(gpu_job(), "finetune.py", ARGS)
    # the same job built again, the environment given in another order: the same text
    env = dict(reversed(list(gpu_job().env.items())))
    assert sbatch_script(gpu_job(env=env), "finetune.py", list(ARGS)) == first
    assert subprocess.run(["bash", "-n"], input=first, text=True).returncode == 0


def test_script_content():
    gpu = sbatch_script(gpu_job(), "finetune.py", ARGS)
    assert gpu.count("\nsrun ") == 1
    assert "#SBATCH --gpus-per-node=8\n" in gpu and "#SBATCH --signal=TERM@120\n" in gpu
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120\n" in gpu
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in gpu
    assert "--container-mounts=/data:/data,/ckpt:/ckpt,/models:/models:ro" in gpu
    cpu = sbatch_script(cpu_job(), "finetune.py", [])
    assert "gpus" not in cpu and "container" not in cpu and "--time" not in cpu
    assert "--account" not in cpu and "--partition" not in cpu
    # every #SBATCH line comes before the first command (sbatch stops reading there)
    lines = cpu.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert "--signal" not in sbatch_script(cpu_job(signal_seconds=0), "finetune.py", [])
    with_cpus = sbatch_script(cpu_job(cpus_per_task=4), "finetune.py", [])
    assert with_cpus.count("--cpus-per-task=4") == 2  # sbatch and srun


def test_arguments_survive_the_shell(tmp_path):
    """The args reach the program exactly: the script's srun line, run by bash with
    srun and the interpreter replaced by a printer of their arguments."""
    text = sbatch_script(cpu_job(python=str(tmp_path / "python"), workdir=str(tmp_path)),
                         "finetune.py", ARGS)
    printer = tmp_path / "python"
    printer.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    printer.chmod(printer.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "srun").write_text("#!/bin/sh\nwhile [ \"${1#--}\" != \"$1\" ]; do shift; done\n"
                                   "exec \"$@\"\n")
    (tmp_path / "srun").chmod(0o755)
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="77")
    result = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[:8] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        "--rdzv_backend=c10d", "--rdzv_endpoint=node1:29611", "--rdzv_id=77",
                        "finetune.py"]
    assert argv[8:] == ARGS


@pytest.mark.parametrize("changes, words", [
    ({"job_name": "my job"}, "job_name"),
    ({"nodes": 0}, "nodes"),
    ({"processes_per_node": 0}, "processes_per_node"),
    ({"time": "4 hours"}, "sbatch time limit"),
    ({"time": "00:01:00", "signal_seconds": 60}, "lower signal_seconds"),
    ({"log_dir": "/logs/my run"}, "log_dir"),
    ({"log_dir": "/logs/100%"}, "log_dir"),
    ({"workdir": "/home/me/my repo"}, "workdir"),
    ({"container_image": None}, "container_mounts without container_image"),
    ({"env": {"BAD-NAME": "1"}}, "shell variable"),
    ({"rdzv_port": 70000}, "TCP port"),
    ({"signal_seconds": -1}, "signal_seconds"),
])
def test_bad_jobs_are_config_errors(changes, words):
    with pytest.raises(ConfigError, match=words):
        gpu_job(**changes)


def test_time_limits():
    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("1:30") == 90
    assert time_limit_seconds("04:00:00") == 4 * 3600
    assert time_limit_seconds("2-00") == 2 * 86400
    assert time_limit_seconds("1-02:03") == 86400 + 2 * 3600 + 3 * 60
    assert time_limit_seconds("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert time_limit_seconds("UNLIMITED") is None
    assert "--time=UNLIMITED" in sbatch_script(cpu_job(time="UNLIMITED"), "finetune.py", [])


def test_write_script_creates_the_log_directory(tmp_path):
    job = cpu_job(workdir=str(tmp_path), log_dir="logs/run")
    path = write_script(job, str(tmp_path / "job.sbatch"), "finetune.py", [])
    assert (tmp_path / "logs" / "run").is_dir()
    assert Path(path).read_text() == sbatch_script(job, "finetune.py", [])


def test_missing_slurm_is_a_user_error_that_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(SlurmNotFound, match="apt-get install slurm-client") as caught:
        submit(str(tmp_path / "job.sbatch"))
    assert isinstance(caught.value, UserError)
    with pytest.raises(SlurmNotFound, match="scontrol"):
        job_state("1")


def test_sbatch_refusal_carries_its_message(tmp_path, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                    "Invalid account or account/partition combination specified' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SlurmError, match="Invalid account"):
        submit(str(tmp_path / "job.sbatch"))


def fake_commands(tmp_path, monkeypatch, **scripts: str) -> None:
    """Put shell scripts named after Slurm commands first on PATH."""
    for name, body in scripts.items():
        (tmp_path / name).write_text("#!/bin/sh\n" + body)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_job_info_falls_back_to_accounting(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch,
                  scontrol="echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n",
                  sacct="echo 'CANCELLED by 0|0:15'\n")
    assert job_info("12") == JobInfo("CANCELLED", 0)
    fake_commands(tmp_path, monkeypatch, sacct="exit 0\n")  # purged, and no accounting
    with pytest.raises(SlurmError, match="knows no job 12.*Invalid job id"):
        job_state("12")


def test_wait_for_fails_fast_on_a_job_that_ended_otherwise(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch,
                  scontrol="echo 'JobId=5 JobName=x JobState=FAILED Reason=NonZeroExitCode "
                           "ExitCode=1:0'\n")
    assert job_info("5") == JobInfo("FAILED", 1)
    with pytest.raises(SlurmError, match="ended FAILED while waiting for RUNNING"):
        wait_for("5", {"RUNNING"}, timeout=60)
    fake_commands(tmp_path, monkeypatch, scontrol="echo 'JobId=5 JobState=PENDING'\n")
    with pytest.raises(SlurmError, match="still PENDING after 0 s"):
        wait_for("5", {"RUNNING"}, timeout=0, poll=0.01)
