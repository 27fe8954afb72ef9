"""Launching the trainer from tests: torchrun, several runs per launch, metrics.

Why a module, not a conftest: fixtures that several test directories share live in
``tests/conftest.py`` (a fixture imported into two conftests would run twice); the
helpers they and the tests call live here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_ext.parallel import free_port

REPO = Path(__file__).resolve().parent.parent
CHATML = ("<|im_start|>", "<|im_end|>")


def model_args(data: dict, iters: int = 6) -> list[str]:
    return ["--data_path", data["prefix"], "--split", "90,10,0",
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", data["vocab_file"],
            "--vocab_extra_ids_list", ",".join(CHATML), "--model_name", "llama2",
            "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4",
            "--num_attention_heads_kv", "2", "--seq_length", "96", "--variable_seq_lengths",
            "--micro_batch_size", "2", "--global_batch_size", "8", "--train_iters", str(iters),
            "--lr", "1e-3", "--lr_warmup_iters", "1", "--eval_iters", "1", "--seed", "1234",
            *data.get("tokenizer_flags", ())]


def torchrun(nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(REPO / "finetune.py"), *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_metrics(directory: Path, split: str = "train") -> list[dict]:
    with open(directory / "metrics.jsonl", encoding="utf-8") as handle:
        return [r for r in map(json.loads, handle) if r["split"] == split]


# ------------------------------------------------------------ several runs per launch
RUN_MANY = REPO / "tests" / "training" / "run_many.py"


def child_env() -> dict:
    """Environment of a child that trains: one thread each (the machine may have 2 cores)."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Launch:
    """One started ``run_many.py`` launch: several trainer runs in one process group.

    Started with :func:`start_runs`, finished with :meth:`wait`, so that two
    launches (say a serial one and a 2-process one) can run side by side.
    """

    def __init__(self, nproc: int, runs: list[dict], directory: Path):
        self.directory, self.runs = directory, runs
        directory.mkdir(parents=True, exist_ok=True)
        spec = directory / "spec.json"
        spec.write_text(json.dumps(runs), encoding="utf-8")
        prefix = [sys.executable]
        if nproc > 1:
            prefix += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_port", str(free_port())]
        self.output = directory / "launch.log"  # a file, not a pipe: nobody reads it meanwhile
        with open(self.output, "wb") as handle:
            self.process = subprocess.Popen([*prefix, str(RUN_MANY), str(spec)],
                                            env=child_env(), cwd=REPO, stdout=handle,
                                            stderr=subprocess.STDOUT)

    def wait(self, timeout: int = 600) -> dict[str, "RunResult"]:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        output = self.output.read_text(errors="replace")
        if self.process.returncode != 0:
            raise AssertionError(f"run_many.py failed ({self.process.returncode}):\n"
                                 f"{output[-8000:]}")
        return {run["name"]: RunResult.read(self.directory, run["name"]) for run in self.runs}


class RunResult:
    """A job's exit status (0, or 1 for a UserError), its log, files it was asked to stat
    right after it ended (``mtimes``) and, for a tool job, its standard output."""

    def __init__(self, returncode: int, log: str, mtimes: dict, stdout: str = ""):
        self.returncode, self.log, self.mtimes, self.stdout = returncode, log, mtimes, stdout

    @classmethod
    def read(cls, directory: Path, name: str) -> "RunResult":
        status = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        log = (directory / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        out = directory / f"{name}.out"
        stdout = out.read_text(encoding="utf-8") if out.exists() else ""
        return cls(status["returncode"], log, status.get("mtimes", {}), stdout)


def logits_job(name: str, load: Path, tokens, directory: Path, tp: int = 1, pp: int = 1,
               vocab_file: str = "") -> dict:
    """A run_many.py job that saves ``load``'s logits for ``tokens`` at TP/PP; read them
    with :func:`job_logits` after the launch. Jobs of any number of checkpoints and
    layouts share one launch (of a world size divisible by each TP x PP)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, directory / f"{name}.tokens.pt")
    return {"name": name, "logits": {
        "load": str(load), "tokens": str(directory / f"{name}.tokens.pt"),
        "out": str(directory / f"{name}.logits.pt"), "tp": tp, "pp": pp,
        "vocab_file": vocab_file}}


def job_logits(results: dict, job: dict):
    """The logits a :func:`logits_job` saved (its run must have succeeded)."""
    import torch

    result = results[job["name"]]
    assert result.returncode == 0, result.log[-3000:]
    return torch.load(job["logits"]["out"])


def tool_job(name: str, tool: str, *argv: str) -> dict:
    """A run_many.py job that runs ``tools/<tool>``'s ``main(argv)`` (with --no_progress)
    in the launch's processes; its standard output is the result's ``stdout``."""
    return {"name": name, "tool": tool, "argv": [*argv, "--no_progress"]}


def start_runs(nproc: int, runs: list[dict], directory: Path) -> Launch:
    return Launch(nproc, runs, directory)


def run_many(nproc: int, runs: list[dict], directory: Path) -> dict[str, RunResult]:
    return Launch(nproc, runs, directory).wait()


ITERS = 6


# ------------------------------------------------------------ memory of a conversion
IMPORT_MEMORY_PROBE = r"""
import sys, threading, time
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
model_path, out, counted, *warm_up = sys.argv[1:]
for path in warm_up:
    import_hf(ImportConfig(path, out + "-warm-up", progress=False))
def used():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return sum(int(fields[key].split()[0]) * 1024 for key in counted.split(","))
base = peak = used()
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, used())
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
import_hf(ImportConfig(model_path, out, max_shard_bytes=8 * 2**20, progress=False))
done = True
thread.join()
print(base, peak)
"""


def import_memory_growth(model_path: Path, out: Path, counted: str = "VmRSS",
                         warm_up: tuple[Path, ...] = ()) -> int:
    """Bytes by which ``import_hf(model_path)`` raises the peak of ``counted`` (fields of
    /proc/self/status, e.g. ``VmRSS`` or ``RssAnon``), in a fresh process, sampled by a
    thread (ru_maxrss would report the forking parent's peak: Linux keeps it across exec).
    ``warm_up``: models imported first, so that what any import costs once (libraries,
    a tokenizer conversion's machinery) is not counted."""
    result = subprocess.run([sys.executable, "-c", IMPORT_MEMORY_PROBE, str(model_path),
                             str(out), counted, *map(str, warm_up)], env=child_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    base, peak = map(int, result.stdout.split()[-2:])
    return peak - base
