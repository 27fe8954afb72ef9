"""The launcher's flags (NeMo's names and short forms), its plan (--dry_run), the local
Hugging Face cache lookup and the torchrun command lines; in-process, nothing trained."""

from __future__ import annotations

import json

import pytest

from megatron_ext.errors import ConfigError
from tests.conftest import REPO, SAMPLE


def parse(*argv: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_cli", REPO / "instruct" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from megatron_ext.cli import build_config
    from megatron_ext.launch.options import SFTConfig

    return build_config(SFTConfig, module.build_parser().parse_args(list(argv)))


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
])
def test_bad_settings_are_refused_together(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse("-E", "exp", "--dataset_path", "d", *argv).validate()


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    from megatron_ext.launch.recipe import run_sft

    config = parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                   str(tmp_path / "model.gguf"), "--experiments_dir", str(tmp_path / "exps"),
                   "-G", "2", "-g", "16", "-m", "4", "--epochs", "2", "--peft", "dora",
                   "--dry_run")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # never opened by a dry run
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

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    text = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                         str(tmp_path / "model.gguf"), "--experiments_dir",
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
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_hf_model_id("org/absent")


def test_torchrun_command_lines():
    from megatron_ext.launch.local import torchrun_command

    one = torchrun_command("finetune.py", ["--x", "1"], nproc=2, python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   "finetune.py", "--x", "1"]
    several = torchrun_command("finetune.py", [], nproc=8, nnodes=2, node_rank=1,
                               master_addr="node0", master_port=29400, python="py")
    assert several[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                           "--master_addr", "node0", "--master_port", "29400", "finetune.py"]


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

    return run_sft(parse("-E", "exp", "--dataset_path", str(data), "--hf_model_id",
                         str(tmp_path / "model.gguf"), "--experiments_dir",
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
