"""Executors behind one interface (launch/executors/: the registry is the files), and the
trainer's command generated from its own config: finetune.py's parser reads the launcher's
flags back as the very TrainConfig the launcher meant. In-process, nothing trained."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.launch import executors
from megatron_ext.launch.base_model import BaseModel
from megatron_ext.launch.executors.base import get_executor
from megatron_ext.launch.experiment import Experiment
from megatron_ext.launch.options import EXECUTORS, SFTConfig
from megatron_ext.launch.recipe import _launch, run_sft, trainer_args, trainer_config
from megatron_ext.parallel import ParallelArgs
from megatron_ext.peft.config import PeftArgs
from megatron_ext.tokenizers import TokenizerConfig
from tests.conftest import REPO, SAMPLE
from tests.launch.test_sft_options import model_config, parse


def test_the_registry_is_the_files():
    files = sorted(p.stem for p in (REPO / "megatron_ext" / "launch" / "executors").glob("*.py")
                   if p.stem not in ("__init__", "base"))
    assert EXECUTORS == executors.executor_names() == tuple(files) == ("local", "slurm")
    assert [get_executor(name).name for name in files] == files
    with pytest.raises(ConfigError, match="use one of local, slurm"):
        get_executor("nowhere")
    with pytest.raises(SystemExit):  # --executor's choices are the registry's
        parse("-E", "x", "--dataset_path", "d", "--executor", "nowhere")


FAKE = '''
from megatron_ext.launch.executors.base import STOPPED, Executor, Ran


class Elsewhere(Executor):
    name = "elsewhere"
    resume = "ask elsewhere again"

    def commands(self, launch):
        return [["elsewhere-submit", launch.script, *launch.args]]

    def run(self, launch):
        return Ran(STOPPED, "queued elsewhere; " + self.follow(launch, "7") + "; " + self.resume)

    def follow(self, launch, handle):
        return f"elsewhere status {handle}"


EXECUTOR = Elsewhere
'''


def test_a_third_executor_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "elsewhere.py").write_text(FAKE, encoding="utf-8")
    monkeypatch.setattr(executors, "__path__", [*executors.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "megatron_ext.launch.executors.elsewhere", raising=False)
    try:
        assert executors.executor_names() == ("elsewhere", "local", "slurm")
        config = dataclasses.replace(parse(
            "-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
            str(model_config(tmp_path / "model")), "--experiments_dir", str(tmp_path / "exps"),
            "--max_steps", "3", "--dry_run"), executor="elsewhere")
        text = run_sft(config).message
        assert "elsewhere-submit" in text and "--train_iters 3" in text
    finally:
        sys.modules.pop("megatron_ext.launch.executors.elsewhere", None)


def test_slurm_dry_run_shows_the_job(tmp_path):
    text = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                         str(model_config(tmp_path / "model")), "--experiments_dir",
                         str(tmp_path / "exps"), "--executor", "slurm", "-N", "2", "-G", "4",
                         "-g", "16", "--max_steps", "5", "--dry_run")).message
    assert f"sbatch {tmp_path / 'exps' / 'plan' / 'job.sbatch'}" in text
    assert "--nnodes=2 --nproc_per_node=4" in text and "--standalone" not in text
    assert not (tmp_path / "exps").exists()


# -- the trainer's flags, generated --------------------------------------------------------------

def hf_model(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    return BaseModel(str(tmp_path / "hf"), str(tmp_path / "imports" / "k"),
                     TokenizerConfig("HFTokenizer", str(tmp_path / "hf")), {})


def checkpoint(tmp_path):
    return BaseModel(str(tmp_path / "ckpt"), None, TokenizerConfig(
        "SentencePieceTokenizer", "tok.model", ("<a>", "<b>"), megatron_llm_specials=False), {})


def gguf(tmp_path):
    return BaseModel(str(tmp_path / "m.gguf"), str(tmp_path / "imports" / "g"),
                     TokenizerConfig("HFTokenizer", "tok.json"), {})


CASES = {
    "lora, an HF model, validation, local": (hf_model, dict(
        peft=PeftArgs(peft="lora", peft_dim=8, peft_target_modules=("q_proj,v_proj",)),
        vocab_extra_ids_list="<|im_start|>,<|im_end|>", num_gpus=2, global_batch_size=8,
        micro_batch_size=2, seq_length=96), ("training", "validation")),
    "full, a checkpoint, no validation, slurm": (checkpoint, dict(
        executor="slurm", num_nodes=2, num_gpus=4, parallel=ParallelArgs(2), bf16=True,
        wandb_project="proj", lr=3e-5, min_lr=1e-7, warmup_steps=10, weight_decay=0.1,
        save_interval=7, seed=5), ("training",)),
    "dora, GGUF, context parallel, slurm": (gguf, dict(
        executor="slurm", peft=PeftArgs(peft="dora"), num_gpus=4,
        parallel=ParallelArgs(pipeline_model_parallel_size=2, context_parallel_size=2),
        global_batch_size=4, micro_batch_size=4,
        seq_length=512), ("training", "validation", "test")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parsing_the_generated_flags_gives_back_the_trainer_config(case, tmp_path, monkeypatch):
    make_base, settings, splits = CASES[case]
    base = make_base(tmp_path)
    if base.imported is None:
        settings = dict(settings, load=base.source)
    else:
        settings = dict(settings, hf_model_id=base.source)
    config = SFTConfig(experiment="exp", dataset_path="d",
                       experiments_dir=str(tmp_path / "exps"), **settings)
    config.validate()
    exp = Experiment(str(tmp_path / "exps" / "exp"), config.identity(),
                     prefixes={s: str(tmp_path / "tok" / s) for s in splits}, train_iters=40)
    from megatron_ext.training.arguments import parse_config

    monkeypatch.setenv("WORLD_SIZE", str(config.world_size))
    argv = trainer_args(config, exp, base)
    assert parse_config(argv) == trainer_config(config, exp, base)  # validated on the way
    assert {"--auto_resume", "--use_checkpoint_args", "--pack_sequences",
            "--variable_seq_lengths"} <= set(argv)
    assert ("--valid_data_path" in argv) == ("validation" in splits)
    assert ("--finetune" in argv) == ("--tokenizer_type" in argv) == (base.imported is None)
    assert ("--import_cache_dir" in argv) == (base.imported is not None)
    launch = _launch(config, exp, base)
    assert launch.args == tuple(argv) and launch.post_command[2:] == (
        "--post_only", "--experiment", "exp", "--experiments_dir", str(tmp_path / "exps"))


def test_the_slurm_job_runs_the_generated_flags_then_the_post_step(tmp_path):
    from megatron_ext.launch.executors.slurm import script_text

    config = SFTConfig(experiment="exp", dataset_path="d", hf_model_id="m", executor="slurm",
                       experiments_dir=str(tmp_path / "exps"), cpu=True, num_gpus=2,
                       global_batch_size=2)
    exp = Experiment(str(tmp_path / "exps" / "exp"), config.identity(),
                     prefixes={"training": "t"}, train_iters=4)
    launch = _launch(config, exp, hf_model(tmp_path))
    text = script_text(launch)
    assert "--train_data_path t" in text and "--train_iters 4" in text
    assert text.rstrip().endswith(f"--post_only --experiment exp --experiments_dir "
                                  f"{tmp_path / 'exps'}")
    assert "--gpus-per-node" not in text


TRAINER_LINES = r"""
import time
for step in (1, 2, 3):
    print(f"12:00:0{step} INFO iter {step}/3 | samples {8 * step} | loss 1.5 | elapsed 00:0{step} | ETA 00:00", flush=True)
print("12:00:04 INFO saved checkpoint", flush=True)
"""


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_gets_a_bar_of_the_trainers_steps_and_the_log_plain_lines(
        tmp_path, monkeypatch, capsys, terminal):
    """Under the launcher the trainer writes to a pipe (no bar of its own): on a terminal
    the launcher draws one from the trainer's ``iter N/M`` lines; the log keeps the lines."""
    from megatron_ext import cli
    from megatron_ext.launch import local

    for module in (cli, local):  # the launcher's check, and the bar's own
        monkeypatch.setattr(module, "on_terminal", lambda stream=None: terminal)
    log = tmp_path / "train.log"
    finished = local.run_logged([sys.executable, "-c", TRAINER_LINES], str(log), dict(os.environ),
                                str(tmp_path), steps_bar=True)
    assert finished.code == 0
    shown = capsys.readouterr().out
    logged = log.read_text().splitlines()[-4:]  # after the command line
    assert len(logged) == 4 and "\r" not in log.read_text()
    assert all(line in shown for line in logged)
    assert ("training: 100%" in shown and "3/3" in shown) == terminal
    assert ("\r" in shown) == terminal


STEP_SCRIPT = """
import os, sys
print("argv", sys.argv[1:])
sys.stderr.write("to stderr\\n")
os.write(2, b"from a C library\\n")
if sys.argv[1] == "crash":
    raise RuntimeError("boom")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("how, code", [("0", 0), ("3", 3), ("crash", 2)])
def test_an_in_process_step_is_shown_and_logged_with_its_exit_status(tmp_path, capfd, how,
                                                                       code):
    """The launcher's evaluations and exports run in its own process (one import of torch
    for all of them): each step's output, written by Python or straight to the file
    descriptors, reaches both the terminal and the step's log; its exit status or crash
    comes back as a code, and the launcher's own argv and output are restored."""
    from megatron_ext.launch import local

    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    log = tmp_path / "logs" / "step.log"
    argv = list(sys.argv)
    assert local.run_in_process([sys.executable, str(script), how], str(log)) == code
    assert sys.argv == argv
    print("after the step")
    captured = capfd.readouterr()
    logged = log.read_text()
    expected = [f"argv ['{how}']", "to stderr", "from a C library"]
    assert all(line in logged and line in captured.out for line in expected), (logged, captured)
    assert ("RuntimeError: boom" in logged) == (how == "crash")
    assert "after the step" in captured.out and "after the step" not in logged
