"""``instruct/sft.py --executor local``: one command trains, evaluates and exports; the
same command again reports the experiment finished; a run stopped by SIGTERM resumes on
the straight run's curve; the tokenization cache; bad input; torchrun's workers exit
when their agent is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CHATML, REPO, SAMPLE
from tests.runs import child_env, train_metrics
from tests.training.test_parallel import assert_same_curve

pytestmark = pytest.mark.slow

SFT = str(REPO / "instruct" / "sft.py")
PHI3_EPOCHS = 2  # experiment "b" and its straight reference
STEPS = 5  # one epoch of the 35 records (of 48) whose answers start within 96 tokens, packed
# into 18 rows of 96 positions, 4 rows a step


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, sp_model) -> Path:
    from tests.tools.conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("sft_base") / "model", sp_model,
                         num_hidden_layers=2)


def dataset(directory: Path, train: int = 48, change: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("training", train), ("validation", 8), ("test", 6)):
        lines = (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        if change and split == "training":
            lines = lines[1:] + lines[:1]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def sft_args(name: str, base: Path, data: Path, root: Path, *extra: str) -> list[str]:
    # a plain base (tokenizer.model, no chat template, no ChatML tokens) and no chat flags:
    # the launcher adds ChatML's tokens itself
    return [sys.executable, SFT, "-E", name, "--hf_model_id", str(base), "--dataset_path",
            str(data), "--experiments_dir", str(root), "--seq_length", "96", "-G", "2",
            "-g", "4", "-m", "2", "--lr", "1e-3", "--save_interval", "2", "--no_progress",
            # 13 of the 48 training records have no answer within 96 tokens
            "--max_rejected_fraction", "0.3", *extra]


def run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


LORA = ("--peft", "lora", "--peft_dim", "8")  # the Slurm tests run full finetuning


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory, sp_model) -> Path:
    """A tiny Phi-3: no family claims it, so the launcher trains it on the hf backend."""
    from tests.training.hf_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sft_phi3") / "phi3", sp_model, "phi3")


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, base_model, phi3_model) -> dict:
    """LoRA experiment "a" straight (then again) on Llama (megatron backend); on a Phi-3
    (the hf backend, chosen by the launcher), "b" stopped by SIGTERM after 2 logged steps
    (of 2 epochs) and relaunched; it starts once "a" has tokenized the data, and then
    trains beside "a". The straight reference for "b" is the trainer command that the
    launcher wrote into b's log, run uninterrupted in the session's one-process worker
    (one process: the hf backend's FSDP over two equals one, tests/training/
    test_hf_backend.py), with its own checkpoint folder: a third launch of the same
    launcher code would cost twice the CPU for nothing that "b" does not cover."""
    root = tmp_path_factory.mktemp("experiments")
    data = dataset(root / "data")
    # with its progress shown (stdout and stderr are files, not a terminal: plain lines)
    first_args = [arg for arg in sft_args("a", base_model, data, root, *LORA, "--export_gguf",
                                          "q8_0") if arg != "--no_progress"]
    outputs = {name: open(root / f"a.{name}", "w+", encoding="utf-8")
               for name in ("stdout", "stderr")}
    first_proc = subprocess.Popen(first_args, env=child_env(), cwd=REPO, text=True,
                                  **outputs)
    deadline = time.monotonic() + 300
    while (time.monotonic() < deadline and first_proc.poll() is None
           and not list(root.glob(".tokenized/*/done.json"))):
        time.sleep(0.05)
    # two epochs: SIGTERM after 2 logged steps leaves room before the end, however late
    # the signal lands on a busy machine
    b = sft_args("b", phi3_model, data, root, "--epochs", str(PHI3_EPOCHS))
    proc = subprocess.Popen(b, env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = root / "b" / "checkpoints" / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(train_metrics(metrics.parent)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stopped_output = proc.communicate(timeout=300)[0]
    stopped_code = proc.returncode
    resumed = run(b)
    straight = _run_straight(root / "b", root / "straight")
    first_proc.wait(timeout=400)
    for handle in outputs.values():
        handle.seek(0)
    first = subprocess.CompletedProcess(first_args, first_proc.returncode,
                                        outputs["stdout"].read(), outputs["stderr"].read())
    for handle in outputs.values():
        handle.close()
    again = run(sft_args("a", base_model, data, root, *LORA))
    return {"root": root, "data": data, "first": first, "again": again,
            "stopped": (stopped_code, stopped_output), "resumed": resumed,
            "straight": straight}


def _run_straight(experiment: Path, out: Path) -> Path:
    """The trainer command of ``experiment``'s first launch (the first line of its first
    training log), saving to ``out`` instead, run to its end in the session's one-process
    worker; ``out``."""
    from tests.runs import run_many

    log = sorted((experiment / "logs").glob("train-*.log"))[0]
    command = log.read_text(encoding="utf-8").splitlines()[0].removeprefix("$ ").split()
    argv = command[next(i for i, part in enumerate(command) if part.endswith("finetune.py"))
                   + 1:]
    for flag, value in (("--save", out / "checkpoints"), ("--tensorboard_dir", out / "tb")):
        argv[argv.index(flag) + 1] = str(value)
    result = run_many(1, [{"name": "straight", "argv": argv}], out / "launch")["straight"]
    assert result.returncode == 0, result.log[-3000:]
    return out / "checkpoints"


def test_one_command_trains_evaluates_and_exports(experiments):
    first = experiments["first"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = experiments["root"] / "a"
    record = json.loads((root / "experiment.json").read_text())
    assert record["status"] == "finished"
    # one epoch: the rows of 96 positions that the records the tokenizer kept (some answers
    # lie past 96 tokens) pack into, 4 a step
    from megatron_ext.data.indexed import sequence_lengths
    from megatron_ext.data.packing import packed_row_count

    records = record["records"]["training"]
    lengths = sequence_lengths(record["prefixes"]["training"])
    rows = packed_row_count(lengths, 96)
    assert 24 < records <= 48 and len(lengths) == records and rows <= records
    assert record["train_iters"] == -(-rows // 4) == STEPS
    assert f"training: {records} records packed into {rows} rows of 96 positions" in first.stderr
    # the records left out: counted and shown with their reason, all kept in the experiment
    rejected = (root / "rejected" / "training.jsonl").read_text().splitlines()
    assert len(rejected) == 48 - records and json.loads(rejected[0])["code"] == "too_long"
    assert f"training: {48 - records} of 48 records rejected" in first.stderr
    assert "would remove the whole answer" in first.stderr
    assert (root / "checkpoints" / f"iter_{STEPS:07d}").is_dir()
    assert len(train_metrics(root)) == STEPS  # metrics.jsonl at the experiment's top
    test = json.loads((root / "eval" / "test.json").read_text())
    assert test["records"] == 6 and record["results"]["test"]["answer_loss"] == test["answer_loss"]
    assert (root / "hf" / "config.json").exists() and (root / "tensorboard").is_dir()
    adapter = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and record["results"]["adapter"] == str(root / "adapter")
    assert "lora: 8 adapted linear layers" in (next((root / "logs").glob("train-*.log"))
                                                .read_text())
    assert list((root / "logs").glob("train-*.log"))
    assert f"experiment a is finished: {STEPS} steps" in first.stdout
    # ChatML's tokens were added at import, and the export carries them and the template
    assert f"lacks the special tokens {', '.join(CHATML)} of the default (chatml)" in first.stderr
    exported = json.loads((root / "hf" / "tokenizer.json").read_text())
    assert set(CHATML) <= {token["content"] for token in exported["added_tokens"]}
    assert "<|im_start|>" in (root / "hf" / "chat_template.jinja").read_text()
    # the adapters' base is the import (tokens added) as a Hugging Face model, in the
    # experiments' shared import cache
    cached = experiments["root"] / ".imported"
    assert adapter["base_model_name_or_path"] == str(next(cached.glob("*.hf")))
    # the summary: the pretrained base (evaluated once, kept) beside the finetuned model
    baseline = json.loads((root / "eval" / "baseline.json").read_text())
    assert baseline["records"] == 6 and record["results"]["baseline"] == baseline
    assert len(list((root / "logs").glob("baseline-*.log"))) == 1
    summary = first.stdout[first.stdout.index("experiment a is finished"):]
    assert "test split (6 records)" in summary and "pretrained" in summary
    assert "finetuned" in summary and f"{baseline['answer_loss']:.4f}" in summary
    assert f"{test['answer_loss']:.4f}" in summary and "final loss: train " in summary
    assert ", validation " in summary and "from the first launch to the end" in summary
    assert f"tensorboard --logdir {root / 'tensorboard'}" in summary
    assert f"loss curve: {root / 'loss.png'}" in summary and f"folder: {root} (" in summary
    assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert record["results"]["train_loss"] == train_metrics(root)[-1]["loss"]
    # progress in logs: plain lines, elapsed and ETA on every training line, no '\r'
    logs = {path.name: path.read_text() for path in (root / "logs").glob("*.log")}
    assert not [name for name, text in logs.items() if "\r" in text]
    assert "\r" not in first.stdout + first.stderr
    train_lines = [line for line in first.stdout.splitlines() if " INFO iter " in line]
    assert len(train_lines) == STEPS, first.stdout[-3000:]
    assert all(" | elapsed " in line and " | ETA " in line for line in train_lines)
    assert "preprocess: " in first.stderr and "(100%) | elapsed" in first.stderr
    assert "generating: 6/6 prompt (100%)" in first.stdout
    # --export_gguf: the merged model for llama.cpp, q8_0, named in the summary
    gguf = root / "gguf" / "model-q8_0.gguf"
    assert record["results"]["gguf"] == str(gguf) and f"llama-cli -m {gguf}" in summary
    from safetensors.torch import load_file

    from megatron_ext.models.gguf_checkpoint import GGUFModel

    merged = {}
    for shard in (root / "hf").glob("*.safetensors"):
        merged.update(load_file(shard))
    ours = GGUFModel(str(gguf))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        want = merged[name].float()
        assert (ours.weights.get(name).float() - want).abs().max() <= want.abs().max() / 100


def test_rerunning_a_finished_experiment_says_so(experiments):
    again = experiments["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"experiment a is already finished: {STEPS} steps" in again.stdout
    assert "torch.distributed.run" not in again.stderr  # nothing was launched


def test_sigterm_then_the_same_command_resumes_on_the_straight_curve(experiments):
    """On the hf backend (a Phi-3, which no family claims): SIGTERM saves, the same
    command resumes from the checkpoint and finishes on the straight run's curve."""
    code, output = experiments["stopped"]
    assert code == 0, output[-3000:]
    assert "training stopped at iteration" in output and "rerun the same command" in output
    assert "no family in models/families claims model_type 'phi3'" in output
    resumed = experiments["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming experiment b" in resumed.stderr
    assert "tokenized data found in the cache" in resumed.stderr  # the same inputs as "a"
    root = experiments["root"]
    stopped_at = int(output.split("training stopped at iteration")[1].split()[0].strip(".,:"))
    assert 2 <= stopped_at < PHI3_EPOCHS * STEPS
    assert "holds a checkpoint of the hf backend: resuming it" in resumed.stdout
    assert_same_curve(train_metrics(root / "b"), train_metrics(experiments["straight"]))
    assert (root / "b" / "hf" / "config.json").exists()  # exported once finished


def test_changed_configuration_and_bad_input_are_refused(experiments, base_model, tmp_path):
    root, data = experiments["root"], experiments["data"]
    changed = run(sft_args("a", base_model, data, root, *LORA, "--lr", "2e-3"), timeout=120)
    assert changed.returncode == 1
    assert "was made by a different configuration" in changed.stderr
    assert "--lr: experiment 0.001, this command 0.002" in changed.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "no training.jsonl": (sft_args("x", base_model, empty, root), "has no training.jsonl"),
        "no model": ([*sft_args("x", base_model, data, root)[:4], "--hf_model_id",
                      "nobody/no-such-model", *sft_args("x", base_model, data, root)[6:]],
                     "not in the local Hugging Face cache"),
        "layout": (sft_args("x", base_model, data, root, "-G", "3", "-T", "2"),
                   "3 processes are not divisible by TP 2"),
    }
    for name, (args, message) in cases.items():
        result = run(args, timeout=120)
        assert result.returncode == 1, name
        assert message in result.stderr, (name, result.stderr[-2000:])
    assert not (root / "x").exists()


def test_tokenization_cache_follows_the_files_content(tmp_path, sp_model):
    from megatron_ext.launch.dataset import find_splits, tokenize
    from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer

    tokenizer = TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML)
    identity = build_tokenizer(tokenizer).identity()
    keys = {"question": "question", "answer": "answer", "system": "system", "messages": None}

    def tokenized(data):
        return tokenize(find_splits(str(data)), str(tmp_path / "cache"), tokenizer, identity,
                        "chatml", None, keys, 96, workers=1, progress=False)

    first = tokenized(dataset(tmp_path / "d1", train=20))
    assert first.made_now and 0 < first.records["training"] <= 20
    assert set(first.records) == {"training", "validation", "test"}
    same = tokenized(dataset(tmp_path / "d2", train=20))  # other folder, same content
    assert not same.made_now and same.key == first.key and same.prefixes == first.prefixes
    changed = tokenized(dataset(tmp_path / "d3", train=20, change=True))
    assert changed.made_now and changed.key != first.key
    assert not list((tmp_path / "cache").glob("*.incomplete*"))


def test_workers_exit_when_the_torchrun_agent_is_killed(tmp_path, train_data):
    """kill -9 of torchrun's agent: its workers (in sessions of their own) exit within
    seconds instead of waiting in a collective."""
    from megatron_ext.parallel import free_port
    from tests.runs import model_args

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(REPO / "finetune.py"),
               *model_args(train_data, 100000), "--save", str(tmp_path / "run")]
    agent = subprocess.Popen(command, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.1)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)],
                                              capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.2)
    for pid in alive:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers still running 15 s after their agent was killed"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.1)
    return alive


# a torchrun agent: starts its worker in a session of its own, then waits
FAKE_AGENT = """
import os, subprocess, sys, time
env = dict(os.environ, TORCHELASTIC_RUN_ID="orphan-test", RANK="0")
worker = subprocess.Popen([sys.executable, *sys.argv[1:]], env=env, start_new_session=True)
print(worker.pid, flush=True)
time.sleep(600)
"""
# a worker that imports what finetune.py imports before it watches its agent, then waits
# as a rank does in a collective whose peers are gone
IMPORTING_WORKER = """
import pathlib, sys, time
pathlib.Path(sys.argv[1]).touch()
import torch, megatron.core  # noqa: E401
pathlib.Path(sys.argv[2]).touch()
from megatron_ext.parallel import exit_when_orphaned
exit_when_orphaned()
time.sleep(600)
"""


def test_a_worker_whose_agent_is_killed_while_it_imports_exits(tmp_path):
    """kill -9 of the agent while its worker still imports: the worker finds itself
    re-parented when it starts watching and exits (it used to watch init, pid 1, and
    wait for the collective's timeout)."""
    (tmp_path / "worker.py").write_text(IMPORTING_WORKER, encoding="utf-8")
    started, imported = tmp_path / "started", tmp_path / "imported"
    agent = subprocess.Popen([sys.executable, "-c", FAKE_AGENT, str(tmp_path / "worker.py"),
                              str(started), str(imported)], env=child_env(), cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    worker = int(agent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline and _alive(worker)
            time.sleep(0.02)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        assert not imported.exists(), "the worker finished importing before the kill"
        deadline = time.monotonic() + 240
        while not imported.exists() and _alive(worker):
            assert time.monotonic() < deadline, "the worker never finished importing"
            time.sleep(0.1)
        assert not _wait_gone([worker], 5), "worker still running 5 s after its imports"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


SAVES = """
import os, sys
from multiprocessing import active_children, resource_tracker
import torch
from megatron_ext.checkpointing.unsharded import save_dist_from_tensors
from megatron_ext.parallel import init_distributed
init_distributed(1, 1, int(sys.argv[2]))  # as the converters do: one process, the CPU layer
forks = []
os.register_at_fork(before=lambda: forks.append(1))
for step in (1, 2):  # a second save reuses what the first set up
    os.makedirs(f"{sys.argv[1]}/{step}")
    save_dist_from_tensors({"embedding.word_embeddings.weight": torch.full((4, 2), step)},
                           f"{sys.argv[1]}/{step}")
children = {int(pid) for name in os.listdir("/proc/self/task")
            for pid in open(f"/proc/self/task/{name}/children").read().split()}
print(len(forks), len(active_children()), resource_tracker._resource_tracker._pid,
      sorted(children))
"""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading it back here
def test_saving_starts_no_helper_process(tmp_path):
    """megatron-core's checkpoint writer writes and reports in the saving process: a save
    forks nothing and leaves no helper (multiprocessing's Manager or resource tracker)
    that a SIGTERM meant for the trainer would kill or that would outlive a killed
    worker; the files it wrote load back."""
    from megatron_ext.parallel import free_port

    result = subprocess.run([sys.executable, "-c", SAVES, str(tmp_path), str(free_port())],
                            env=child_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["0", "0", "None", "[]"], result.stdout
    from megatron_ext.checkpointing.unsharded import iter_dist_checkpoint

    for step in (1, 2):
        tensors = {name: tensor for part in iter_dist_checkpoint(str(tmp_path / str(step)))
                   for name, tensor in part.items()}
        assert tensors["embedding.word_embeddings.weight"].eq(step).all(), tensors


def test_gguf_export_of_adapters_whose_base_is_gone_is_refused(experiments, tmp_path):
    """An adapter checkpoint exports its base with the adapters merged in: a base that is
    gone is one clear error, and nothing is written."""
    from megatron_ext.checkpointing.gguf_export import export_gguf
    from megatron_ext.checkpointing.options import GGUFExportConfig
    from megatron_ext.errors import UserError

    with pytest.raises(UserError, match="its base checkpoint .* is gone; pass the base model"):
        export_gguf(GGUFExportConfig(load=str(experiments["root"] / "a" / "checkpoints"),
                                     out=str(tmp_path / "a.gguf"), base=str(tmp_path / "gone"),
                                     progress=False))
    assert not list(tmp_path.iterdir())
