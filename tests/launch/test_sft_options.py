"""The launcher's flags (NeMo's names and short forms), its plan (--dry_run), the local
Hugging Face cache lookup and the torchrun command lines; in-process, nothing trained."""

from __future__ import annotations

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
