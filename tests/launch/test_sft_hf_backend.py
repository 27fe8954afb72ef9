"""``instruct/sft.py --hf_model_id DIR`` with a model no family claims: the launcher
plans the hf backend (no import, no baseline, the model's own tokenizer, ``--load DIR``
without ``--finetune``) and refuses a GGUF export of it. In-process: a dry run reads
config.json and the tokenizer, no weights."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def _dry_run(tmp_path, model, *flags):
    from megatron_ext.launch.recipe import run_sft

    outcome = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                            str(model), "--experiments_dir", str(tmp_path / "exps"), "-G", "2",
                            "-g", "16", "-m", "4", "--epochs", "1", "--dry_run", *flags))
    assert outcome.state == "planned"
    train = next(line for line in outcome.message.splitlines() if "finetune.py" in line)
    return outcome.message, train


@pytest.fixture
def phi3(tmp_path, sp_model):
    return config_only(tmp_path / "phi3", sp_model, "phi3")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_dry_run_of_a_model_without_a_family_plans_the_hf_backend(tmp_path, sp_model, arch):
    """Every architecture that tests/training/test_hf_architectures.py trains (SIGTERM and
    resume, evaluation, export) is planned by the launcher on the hf backend."""
    assert set(CLASSES) == set(ARCHITECTURES)
    model = config_only(tmp_path / arch, sp_model, arch)
    text, train = _dry_run(tmp_path, model)
    assert f"backend: hf (no family claims model_type '{arch}'" in text
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


def _trainer_resolves(train: str) -> object:
    """The planned trainer command, parsed and resolved as finetune.py's ranks would."""
    import shlex

    from megatron_ext.training.arguments import parse_config
    from megatron_ext.training.plan import resolve

    argv = shlex.split(train)
    argv = argv[next(i for i, part in enumerate(argv) if part.endswith("finetune.py")) + 1:]
    return resolve(parse_config(argv), world_size=2, announce=False)


def test_backend_hf_trains_a_model_a_family_claims_as_it_is(tmp_path, sp_model):
    """``sft.py --backend hf`` on a Llama (which the llama family claims): the Hugging Face
    model itself, unimported, as the trainer's --backend hf compares the two backends."""
    llama = model_config(tmp_path / "llama")
    shutil.copy(sp_model, llama / "tokenizer.model")
    text, train = _dry_run(tmp_path, llama, "--backend", "hf")
    assert "backend: hf (--backend hf: transformers' own model, not imported" in text
    assert "--backend hf" in train and f"--load {llama}" in train
    assert "--finetune" not in train and "--import_cache_dir" not in train
    assert "baseline.json" not in text
    assert _trainer_resolves(train).config.backend.backend == "hf"
    # the default plans the import and megatron-core
    text, train = _dry_run(tmp_path, llama)
    assert "backend: hf" not in text and "--backend" not in train
    assert "--import_cache_dir" in train


def test_a_gguf_file_trains_on_the_hf_backend_with_its_own_tokenizer(tmp_path,
                                                                      hf_tokenizer_dir):
    """``sft.py --backend hf --hf_model_id model.gguf``: the file's own tokenizer, rebuilt
    once into the experiments' import cache, is what the data is tokenized with and what
    the trainer reads (--vocab_file); the trainer's own plan accepts the command."""
    from megatron_ext.launch.base_model import IMPORT_CACHE
    from tests.checkpointing.gguf_files import write_gguf

    gguf, _ = write_gguf(tmp_path / "tiny.gguf", "llama-tied",
                         Path(hf_tokenizer_dir) / "tokenizer.json")
    text, train = _dry_run(tmp_path, gguf, "--backend", "hf")
    [folder] = (tmp_path / "exps" / IMPORT_CACHE).glob("tiny-*.tokenizer")
    assert (folder / "tokenizer.json").exists()
    assert f"--load {gguf}" in train and "--backend hf" in train
    assert f"--vocab_file {folder}" in train and "--tokenizer_type HFTokenizer" in train
    resolved = _trainer_resolves(train).config.tokenizer
    assert resolved.vocab_file == str(folder) and resolved.tokenizer_type == "HFTokenizer"


def test_a_backend_the_model_cannot_take_is_refused_before_anything_runs(tmp_path, phi3,
                                                                         sp_model):
    with pytest.raises(ConfigError, match=r"--backend megatron: no family in models/families "
                       r"claims .*'phi3'.*--backend hf"):
        _dry_run(tmp_path, phi3, "--backend", "megatron")
    from megatron_ext.launch.recipe import run_sft

    with pytest.raises(ConfigError, match=r"--backend hf trains a Hugging Face model as it is"):
        run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--load",
                      str(tmp_path / "ckpt"), "--experiments_dir", str(tmp_path / "exps"),
                      "--backend", "hf", "--dry_run"))
    assert not (tmp_path / "exps").exists()
