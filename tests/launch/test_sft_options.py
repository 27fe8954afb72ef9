"""The launcher's flags (NeMo's names and short forms), its plan (--dry_run), the local
Hugging Face cache lookup and the torchrun command lines; in-process, nothing trained."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.launch.base_model import BaseModel
from megatron_ext.launch.executors.base import Launch
from megatron_ext.launch.experiment import Experiment
from megatron_ext.launch.options import RUNTIME_FIELDS
from megatron_ext.parallel import ParallelArgs
from megatron_ext.peft.config import PeftArgs
from tests.conftest import REPO, SAMPLE


def parse(*argv: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_cli", REPO / "instruct" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from megatron_ext.cli import build_config
    from megatron_ext.launch.options import SFTConfig

    return build_config(SFTConfig, module.build_parser().parse_args(list(argv)))


def model_config(directory, **settings):
    """A Hugging Face model directory with its config.json only (no weights, no tokenizer):
    all that the launcher reads of a base model before it imports it."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **settings}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_short_flags_are_nemo_recipe_flags():
    config = parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m", "-N", "2", "-G",
                   "8", "-T", "4", "-P", "2", "-g", "128", "-m", "2", "-a", "acct", "-p", "gpu",
                   "-i", "image.sqsh", "--time", "04:00:00", "--executor", "slurm", "--peft",
                   "lora", "--peft-dim", "8")
    assert (config.experiment, config.num_nodes, config.num_gpus,
            config.parallel.tensor_model_parallel_size,
            config.parallel.pipeline_model_parallel_size,
            config.global_batch_size, config.micro_batch_size, config.account,
            config.partition, config.container_image) == (
        "exp", 2, 8, 4, 2, 128, 2, "acct", "gpu", "image.sqsh")
    assert config.peft.peft == "lora" and config.peft.peft_dim == 8
    assert config.learning_rate == 1e-4  # the PEFT default
    config.validate()


@pytest.mark.parametrize("argv, message", [
    (["--hf_model_id", "m", "--load", "c"], "--hf_model_id (a Hugging Face directory"),
    (["--hf_model_id", "m", "-G", "3", "-T", "2"], "3 processes are not divisible by TP 2"),
    (["--hf_model_id", "m", "-G", "2", "-g", "3"], "--global_batch_size 3 is not divisible"),
    (["--hf_model_id", "m", "-C", "2", "-G", "2", "--seq_length", "1022"],
     "--seq_length 1022 is not one"),
    (["--hf_model_id", "m", "-C", "2", "-G", "3"], "3 processes are not divisible by TP 1 x PP 1 x "
                                                   "CP 2"),
    (["--hf_model_id", "m", "--max_steps", "3", "--epochs", "1"], "not both"),
    (["--hf_model_id", "m", "-N", "2"], "run the command on every node"),
    (["--load", "c", "--vocab_extra_ids_list", "<a>"], "keeps the tokenizer it was trained"),
    (["--hf_model_id", "m", "-G", "0"], "--num_gpus must be positive"),
    (["--hf_model_id", "m", "--eval_max_new_tokens", "0"], "--eval_max_new_tokens must be"),
])
def test_bad_settings_are_refused_together(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse("-E", "exp", "--dataset_path", "d", *argv).validate()


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    from megatron_ext.launch.recipe import run_sft

    config = parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                   str(model_config(tmp_path / "model")), "--experiments_dir",
                   str(tmp_path / "exps"), "-G", "2", "-g", "16", "-m", "4", "--epochs", "2",
                   "--peft", "dora", "--dry_run")  # a dry run reads the config, no weights
    outcome = run_sft(config)
    text = outcome.message
    assert outcome.state == "planned"
    assert "steps estimated from 794 training lines" in text and "steps: 100;" in text
    assert "TP 1 x PP 1 x DP 2; micro batch 4, global batch 16" in text
    assert "--standalone" in text and "--peft dora" in text and "--adapter_only" in text
    assert "evaluate.py" in text and "megatron_to_hf.py" in text
    assert not (tmp_path / "exps").exists()


def test_dry_run_passes_context_parallelism_to_the_trainer(tmp_path):
    from megatron_ext.launch.recipe import run_sft

    text = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                         str(model_config(tmp_path / "model")), "--experiments_dir",
                         str(tmp_path / "exps"), "-G", "4", "-C", "2", "-g", "16", "-m", "4",
                         "--epochs", "1", "--dry_run")).message
    assert "TP 1 x PP 1 x CP 2 x DP 2; micro batch 4" in text
    assert "--context_parallel_size 2" in text


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    from megatron_ext.launch.base_model import resolve_hf_model_id

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    import huggingface_hub._snapshot_download as snapshots

    monkeypatch.setattr(snapshots, "HF_HUB_CACHE", str(cache), raising=False)
    assert resolve_hf_model_id("org/tiny") == str(snapshot)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache") as absent:
        resolve_hf_model_id("org/absent")
    assert "(e.g. hf download org/absent)" in str(absent.value)  # huggingface-cli is gone


def test_torchrun_command_lines():
    from megatron_ext.launch.local import torchrun_command

    one = torchrun_command("finetune.py", ["--x", "1"], nproc=2, python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   "finetune.py", "--x", "1"]
    several = torchrun_command("finetune.py", [], nproc=8, nnodes=2, node_rank=1,
                               master_addr="node0", master_port=29400, python="py")
    assert several[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                           "--master_addr", "node0", "--master_port", "29400", "finetune.py"]


# -- issue 20: refused early, once, with the flags the user knows ------------------------------

@pytest.mark.parametrize("dry_run", [True, False])
def test_a_model_the_layout_cannot_split_is_refused_before_anything_starts(
        tmp_path, monkeypatch, dry_run):
    """9 heads over TP 2: refused from the model's config.json alone, by the trainer's own
    check, before the model is imported, the data tokenized or torchrun started."""
    from megatron_ext.launch import base_model, local, recipe

    def never(*args, **kwargs):
        raise AssertionError("the launch went past its checks")

    monkeypatch.setattr(base_model, "prepare_base", never)  # the import (torch)
    monkeypatch.setattr(recipe, "get_executor", never)  # torchrun
    monkeypatch.setattr(local, "run_logged", never)
    model = model_config(tmp_path / "nine", num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=72)
    config = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", str(model),
                   "--experiments_dir", str(tmp_path / "exps"), "-G", "2", "-T", "2",
                   *(["--dry_run"] if dry_run else []))
    with pytest.raises(ConfigError) as refused:
        recipe.run_sft(config)
    message = str(refused.value)
    assert message.count("--num_attention_heads 9 is not divisible by "
                         "--tensor_model_parallel_size 2") == 1
    assert "9 attention heads, 3 key/value heads" in message
    assert "rerunning the same command fails the same way" in message
    assert not (tmp_path / "exps").exists()
    # the same model on a layout that splits it goes on (to the plan)
    if dry_run:
        fine = dataclasses.replace(config, parallel=ParallelArgs(tensor_model_parallel_size=1))
        monkeypatch.undo()
        assert recipe.run_sft(fine).state == "planned"


def test_the_trainer_plan_is_resolved_before_torchrun(tmp_path, monkeypatch):
    """What only the resolved run plan knows (here: adapter targets the model lacks) is
    refused by the launcher itself, once, before torchrun starts."""
    from megatron_ext.launch import recipe

    model = model_config(tmp_path / "model")
    imported = tmp_path / "import"
    imported.mkdir()
    (imported / "unsharded.json").write_text("{}")
    (imported / "run_config.json").write_text(json.dumps({
        "model": recipe.planned_base(str(model), None, str(tmp_path / "exps")).model,
        "tokenizer": {"tokenizer_type": "SentencePieceTokenizer", "vocab_file": "tok.model"}}))
    config = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", str(model),
                   "--experiments_dir", str(tmp_path / "exps"), "--max_steps", "2", "--peft",
                   "lora", "--peft_target_modules", "no_such_proj")
    exp = Experiment(str(tmp_path / "exps" / "x"), config.identity(),
                     prefixes={"training": "t"}, train_iters=2)
    base = BaseModel(str(model), str(imported), None, {})
    with pytest.raises(ConfigError, match="--peft_target_modules no_such_proj: matches no layer"):
        recipe.resolve_trainer_plan(config, exp, base)
    fine = dataclasses.replace(config, peft=PeftArgs(peft="lora"))
    assert recipe.resolve_trainer_plan(fine, exp, base).peft.targets == (
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


RANKS = r"""
import os, subprocess, sys
print("worker output before the error", flush=True)
code = "from megatron_ext.cli import run_cli\nfrom megatron_ext.errors import ConfigError\n" \
       "def main():\n    raise ConfigError('--bf16 needs CUDA')\nrun_cli(main)"
for rank in range(2):
    subprocess.run([sys.executable, "-c", code])
print("Traceback (most recent call last):\ntorch.distributed.elastic.multiprocessing.errors."
      "ChildFailedError: finetune.py FAILED", flush=True)
sys.exit(1)
"""


def test_a_ranks_user_error_is_said_once_without_torchruns_traceback(tmp_path, monkeypatch,
                                                                     capfd):
    """A configuration error that only the ranks find: the launcher says the trainer's
    message once, not each rank's copy and torchrun's traceback, and does not advise
    rerunning the same command (it would fail the same way)."""
    import sys

    from megatron_ext.launch.executors import local
    from megatron_ext.launch.executors.base import TrainingFailed

    monkeypatch.setattr(local, "torchrun_command",
                        lambda *args, **kwargs: [sys.executable, "-c", RANKS])
    config = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", "m", "-G", "2")
    exp = Experiment(str(tmp_path / "x"), {}, train_iters=2)
    launch = Launch(config, exp, "finetune.py", (), str(REPO), ())
    with pytest.raises(TrainingFailed) as failed:
        local.LocalExecutor().run(launch)
    message = str(failed.value)
    assert message.startswith("the trainer stopped: --bf16 needs CUDA\n(its log: ")
    assert "rerun the same command" not in message
    shown = capfd.readouterr()
    assert "worker output before the error" in shown.out
    assert "ChildFailedError" not in shown.out + shown.err
    assert "--bf16 needs CUDA" not in shown.out + shown.err
    [log] = (tmp_path / "x" / "logs").glob("train-*.log")
    assert "ChildFailedError" in log.read_text()  # kept for whoever wants it
    assert log.read_text().endswith("error: --bf16 needs CUDA\n")
    assert not list((tmp_path / "x" / "logs").glob("*.error"))


def test_a_resolved_identity_is_no_difference(tmp_path):
    """An explicit default, another spelling of the same path: the same experiment."""
    from megatron_ext.launch.experiment import open_experiment

    model = model_config(tmp_path / "model")
    first = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", str(model),
                  "--peft", "lora")
    root = str(tmp_path / "exps" / "x")
    open_experiment(root, first.identity()).save()
    same = parse("-E", "x", "--dataset_path", str(SAMPLE) + "/", "--hf_model_id",
                 os.path.relpath(model) + "/", "--peft", "lora", "--lr", "1e-4",
                 "--epochs", "1", "--lora_r", "16")
    assert open_experiment(root, same.identity()).identity == first.identity()
    other = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", str(model),
                  "--peft", "lora", "--lora_r", "8", "--lr", "2e-4")
    with pytest.raises(ConfigError) as refused:
        open_experiment(root, other.identity())
    message = str(refused.value)
    assert "--peft_dim: experiment 16, this command 8" in message
    assert "--lr: experiment 0.0001, this command 0.0002" in message
    assert "peft." not in message and "None" not in message
    plain = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", str(model))
    with pytest.raises(ConfigError) as refused:
        open_experiment(root, plain.identity())
    assert "--peft: experiment 'lora', this command not given" in str(refused.value)
    assert "--peft_dim" not in str(refused.value)  # follows from --peft


def test_a_record_of_before_is_compared_resolved(tmp_path):
    """experiment.json written before identities were resolved (lr None for the default,
    a relative path, the disabled adapters' settings): the same command still matches."""
    from megatron_ext.launch.experiment import RECORD, open_experiment

    config = parse("-E", "x", "--dataset_path", str(SAMPLE), "--hf_model_id", "org/model")
    old = dict(json.loads(json.dumps(dataclasses.asdict(config))), lr=None, epochs=None,
               dataset_path=os.path.relpath(SAMPLE))
    old = {k: v for k, v in old.items() if k not in RUNTIME_FIELDS and k != "experiment"}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RECORD).write_text(json.dumps({"identity": old, "status": "training"}))
    assert open_experiment(str(tmp_path / "x"), config.identity()).status == "training"


@pytest.mark.parametrize("argv, message", [
    (["--peft_dim", "8", "--lora_alpha", "16"],
     "--peft_dim 8, --peft_alpha 16.0: adapter settings, which do nothing without --peft; "
     "add --peft lora"),
    (["--lora_target_modules", "q_proj"], "--peft_target_modules q_proj: adapter settings"),
    (["-a", "acct", "--time", "04:00:00", "--wait"],
     "--account acct, --time 04:00:00, --wait: only read with --executor slurm"),
    (["--master_addr", "node0"], "--master_addr node0: only read with --num_nodes > 1"),
    (["--executor", "slurm", "--node_rank", "1"], "--node_rank 1: only read with --executor "
                                                  "local"),
    (["-G", "2", "-m", "2", "-g", "8", "--gradient_accumulation_steps", "4"],
     "--global_batch_size 8 and --gradient_accumulation_steps 4 disagree: the steps give "
     "--micro_batch_size 2 x 4 x data-parallel size 2 = 16"),
])
def test_flags_that_would_do_nothing_are_refused(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m", *argv).validate()


@pytest.mark.parametrize("spelling", ["_", "-"])
def test_trl_flag_names_are_aliases(spelling):
    def flag(name):
        return "--" + name.replace("_", spelling)

    config = parse("-E", "exp", "--dataset_path", "d", flag("model_name_or_path"), "org/m",
                   flag("learning_rate"), "3e-4", flag("num_train_epochs"), "2",
                   flag("per_device_train_batch_size"), "4",
                   flag("gradient_accumulation_steps"), "2", "-G", "2", "-N", "1", "-T", "1",
                   flag("use_peft"), flag("lora_r"), "8", flag("lora_alpha"), "16",
                   flag("lora_dropout"), "0.1", flag("lora_target_modules"), "q_proj", "v_proj")
    config.validate()
    assert (config.hf_model_id, config.lr, config.epochs, config.micro_batch_size) == (
        "org/m", 3e-4, 2.0, 4)
    assert config.global_batch_size == 4 * 2 * 2  # micro x accumulation x data-parallel size
    assert config.peft == PeftArgs(peft="lora", peft_dim=8, peft_alpha=16.0, peft_dropout=0.1,
                                   peft_target_modules=("q_proj", "v_proj"))
    # the accumulation steps are how this launch runs; the global batch is the experiment's
    assert "gradient_accumulation_steps" not in config.identity()
    assert config.identity()["global_batch_size"] == 16
    tp2 = parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m", "-G", "4", "-T", "2",
                "-m", "2", flag("gradient_accumulation_steps"), "3")
    assert tp2.global_batch_size == 2 * 3 * 2
    assert parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m").global_batch_size == 32


def test_the_command_says_a_layout_error_once(tmp_path):
    """The command itself: one message on stderr, no traceback, no torchrun, no folder."""
    import subprocess
    import sys

    from tests.runs import child_env

    model = model_config(tmp_path / "nine", num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=72)
    result = subprocess.run(
        [sys.executable, str(REPO / "instruct" / "sft.py"), "-E", "x", "--dataset_path",
         str(SAMPLE), "--hf_model_id", str(model), "--experiments_dir", str(tmp_path / "exps"),
         "-G", "2", "-T", "2"], env=child_env(), cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("error: ") == 1 and "\nerror: the base" in "\n" + result.stderr
    assert result.stderr.count("--num_attention_heads 9 is not divisible") == 1
    assert "Traceback" not in result.stderr and "torch.distributed.run" not in result.stderr
    assert not (tmp_path / "exps").exists()


# -- the dataset folder: record formats, rejected records, splits (nothing trained) -----------
class Trained(Exception):
    """Raised where the launcher would start training."""


@pytest.fixture
def launcher(monkeypatch, sp_model):
    """``run_sft`` with the base model's import replaced by a SentencePiece tokenizer (the
    calls recorded) and training replaced by :class:`Trained`."""
    from megatron_ext.launch import base_model, recipe
    from megatron_ext.tokenizers import SENTENCEPIECE, TokenizerConfig
    from tests.conftest import CHATML

    imports = []

    def prepare_base(*args, **kwargs):
        imports.append(args)
        return base_model.BaseModel("model", None, TokenizerConfig(
            SENTENCEPIECE, sp_model, CHATML, megatron_llm_specials=False), {})

    def train(*args):
        raise Trained

    monkeypatch.setattr(base_model, "prepare_base", prepare_base)
    monkeypatch.setattr(recipe, "_train", train)
    return imports


def folder(path, **splits):
    from tests.conftest import write_jsonl

    path.mkdir()
    for name, records in splits.items():
        write_jsonl(path / f"{name}.jsonl", records)
    return path


def sft(tmp_path, data, *argv):
    from megatron_ext.launch.recipe import run_sft

    model = tmp_path / "model"
    if not model.exists():
        model_config(model)  # its config is read before the (replaced) import
    return run_sft(parse("-E", "exp", "--dataset_path", str(data), "--hf_model_id",
                         str(model), "--experiments_dir",
                         str(tmp_path / "exps"), "--chat_format", "chatml", "--max_steps", "1",
                         "--no_progress", *argv))


NEMO = [{"input": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(40)]


def test_nemo_records_are_detected_and_all_accepted(tmp_path, launcher, caplog):
    data = folder(tmp_path / "data", training=NEMO, validation=NEMO[:4])
    with caplog.at_level("INFO"), pytest.raises(Trained):
        sft(tmp_path, data)
    record = json.loads((tmp_path / "exps" / "exp" / "experiment.json").read_text())
    assert record["records"] == {"training": 40, "validation": 4}
    assert f"{data / 'training.jsonl'}: input/output (NeMo) records (detected" in caplog.text


def test_a_format_mistake_is_reported_before_the_model_is_imported(tmp_path, launcher):
    from megatron_ext.errors import DataError

    data = folder(tmp_path / "data", training=NEMO)
    with pytest.raises(DataError, match="none of the first 40 records has the key\\(s\\) "
                                        "'question', 'answer' .* their keys are 'input', "
                                        "'output'"):
        sft(tmp_path, data, "--question_key", "question", "--answer_key", "answer")
    mixed = folder(tmp_path / "mixed", training=[*NEMO[:3], {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=f"{mixed / 'training.jsonl'}:4: a record in the "
                                        "question/answer"):
        sft(tmp_path, mixed)
    assert launcher == []  # nothing imported


def test_rejected_records_are_shown_kept_and_stop_the_launch(tmp_path, launcher, caplog):
    from megatron_ext.errors import DataError

    records = list(NEMO)
    records[2] = {"input": "no answer"}
    records[6] = "{not json"
    data = folder(tmp_path / "data", training=records)
    path = data / "training.jsonl"
    with pytest.raises(DataError) as info:  # 2 of 40 = 5%, over the default 1%
        sft(tmp_path, data)
    message = str(info.value)
    kept = tmp_path / "exps" / "exp" / "rejected" / "training.jsonl"
    assert message.startswith(f"{path}: 2 of 40 records rejected (5.0%), more than "
                              f"--max_rejected_fraction 0.01; the first: {path}:3: missing "
                              f"key 'output'; {path}:7: malformed JSON")
    assert f"in {kept}" in message and "raise --max_rejected_fraction" in message
    assert [json.loads(line)["line"] for line in kept.read_text().splitlines()] == [3, 7]
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(Trained):  # allowed: trains on the 38
        sft(tmp_path, data, "--max_rejected_fraction", "0.05")
    assert "training: 2 of 40 records rejected (5.0%)" in caplog.text
    assert f"{path}:3: missing key 'output'" in caplog.text
    assert "tokenized data found in the cache" in caplog.text  # the limit is no cache key


def test_splits_under_other_names_are_named(tmp_path):
    from megatron_ext.launch.dataset import find_splits

    data = folder(tmp_path / "data", train=NEMO, val=NEMO, test=NEMO)
    with pytest.raises(ConfigError, match=r"holds train.jsonl \(rename it training.jsonl\), "
                                          r"val.jsonl \(rename it validation.jsonl\): the "
                                          "splits are read from training.jsonl"):
        find_splits(str(data))


def test_a_missing_validation_split_is_said_once(tmp_path, launcher, caplog):
    data = folder(tmp_path / "data", training=NEMO, test=NEMO[:3])
    with caplog.at_level("INFO"), pytest.raises(Trained):
        sft(tmp_path, data)
    said = [r.getMessage() for r in caplog.records if "no validation split" in r.getMessage()]
    assert said == [f"{data}: no validation split (validation.jsonl): no validation loss "
                    "during training, only the training loss"]
    alpaca = [{"instruction": "i", "input": "x", "output": "o"}]
    plan = sft(tmp_path, folder(tmp_path / "alpaca", training=alpaca, test=alpaca),
               "--dry_run", "-E", "plan").message
    assert "no validation split (validation.jsonl)" in plan and "no test split" not in plan
    # the test split is evaluated with the detected keys, Alpaca's input joined as in training
    assert ("evaluate.py --load {} --input {} --question_key instruction --answer_key output "
            "--system_key system --context_key input").format(
        tmp_path / "exps" / "plan" / "checkpoints", tmp_path / "alpaca" / "test.jsonl") in plan
    from megatron_ext.launch.dataset import find_splits

    assert find_splits(str(tmp_path / "data")).notes == (
        "no validation split (validation.jsonl): no validation loss during training, only the "
        "training loss",)
    only_training = folder(tmp_path / "only", training=alpaca)
    assert find_splits(str(only_training)).notes[1] == (
        "no test split (test.jsonl): the model is not evaluated after training (it is still "
        "exported)")


def test_a_mixture_of_experts_base_is_planned_with_expert_parallelism(tmp_path):
    """A Mixtral base: the plan passes EP to the trainer; an EP that does not divide the
    processes is refused before anything runs."""
    from megatron_ext.launch.recipe import run_sft

    base = model_config(tmp_path / "model", architectures=["MixtralForCausalLM"],
                        model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)

    def plan(*extra):
        return run_sft(parse("-E", "moe", "--dataset_path", str(SAMPLE), "--hf_model_id",
                             str(base), "--experiments_dir", str(tmp_path / "exps"), "-G", "2",
                             "-g", "16", "-m", "4", "--epochs", "1", "--dry_run", *extra))

    outcome = plan("--expert_model_parallel_size", "2")
    assert outcome.state == "planned"
    assert "--expert_model_parallel_size 2" in outcome.message
    assert "TP 1 x PP 1 x DP 2 (experts: EP 2); micro batch 4" in outcome.message
    with pytest.raises(ConfigError, match="not divisible by TP 1 x PP 1 x EP 3"):
        plan("--expert_model_parallel_size", "3")
    assert not (tmp_path / "exps" / "moe").exists()
