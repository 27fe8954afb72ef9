"""``instruct/sft.py --hf_model_id DIR`` with a model no family claims: the launcher
plans the hf backend (no import, no baseline, the model's own tokenizer, ``--load DIR``
without ``--finetune``) and refuses a GGUF export of it. In-process: a dry run reads
config.json and the tokenizer, no weights."""

from __future__ import annotations

import shutil

import pytest

from megatron_ext.errors import ConfigError
from tests.conftest import SAMPLE
from tests.launch.test_sft_options import model_config, parse
from tests.training.hf_models import ARCHITECTURES


CLASSES = {"phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
           "olmo2": "Olmo2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "cohere": "CohereForCausalLM"}


def config_only(directory, sp_model, model_type: str):
    """A model directory of ``model_type`` with its config.json and tokenizer.model only."""
    model = model_config(directory, architectures=[CLASSES[model_type]], model_type=model_type)
    shutil.copy(sp_model, model / "tokenizer.model")
    return model


@pytest.fixture
def phi3(tmp_path, sp_model):
    return config_only(tmp_path / "phi3", sp_model, "phi3")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_dry_run_of_a_model_without_a_family_plans_the_hf_backend(tmp_path, sp_model, arch):
    """Every architecture that tests/training/test_hf_architectures.py trains (SIGTERM and
    resume, evaluation, export) is planned by the launcher on the hf backend."""
    assert set(CLASSES) == set(ARCHITECTURES)
    from megatron_ext.launch.recipe import run_sft

    model = config_only(tmp_path / arch, sp_model, arch)
    outcome = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                            str(model), "--experiments_dir", str(tmp_path / "exps"), "-G", "2",
                            "-g", "16", "-m", "4", "--epochs", "1", "--dry_run"))
    text = outcome.message
    assert outcome.state == "planned"
    assert f"backend: hf (no family claims model_type '{arch}'" in text
    train = next(line for line in text.splitlines() if "finetune.py" in line)
    assert f"--load {model}" in train and "--finetune" not in train
    assert f"--vocab_file {model / 'tokenizer.model'}" in train
    assert "--import_cache_dir" not in train and "--use_checkpoint_args" not in train
    assert "baseline.json" not in text and "megatron_to_hf.py" in text
    assert not (tmp_path / "exps").exists()


def test_gguf_export_of_an_hf_backend_model_is_refused_before_anything_runs(tmp_path, phi3):
    from megatron_ext.launch.recipe import run_sft

    with pytest.raises(ConfigError, match="--export_gguf: .* trains on the hf backend"):
        run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id", str(phi3),
                      "--experiments_dir", str(tmp_path / "exps"), "--export_gguf", "q8_0",
                      "--max_steps", "1", "--dry_run"))
