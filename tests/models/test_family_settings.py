"""A family's own settings live in its file: the config, the flags, run_config.json's form,
the checkpoint shape check, the builder and the legacy writer handle them generically."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from megatron_ext.models.config import ModelArgs, family_setting_problems, setting_differences
from megatron_ext.models.families import families, setting_fields
from tests.conftest import REPO

# a family that brings a setting no other family has: dropped into the registry as one file
NEW_FAMILY = '''
from dataclasses import dataclass
from typing import Optional

from megatron_ext.models.family import LLAMA_LAYOUT, Family, FamilySettings, setting


@dataclass(frozen=True)
class Settings(FamilySettings):
    attention_scale: Optional[float] = setting(0.125, "attention scores times this",
                                               off=None, example=0.25)

    def problems(self, model):
        if self.attention_scale is not None and self.attention_scale <= 0:
            return [f"--attention_scale {self.attention_scale} must be positive"]
        return []

    def transformer_config(self, model):
        return {"softmax_scale": self.attention_scale}


FAMILY = Family(name="scaledllama", legacy_name="llama2", **LLAMA_LAYOUT, settings=Settings)
'''

CHECKS = '''
import dataclasses, json, sys
import megatron_ext.models.families as registry
registry.__path__.append(sys.argv[1])
from megatron_ext.models.config import ModelArgs, family_setting_problems, setting_differences
from megatron_ext.training.arguments import build_parser, config_from_args

BASE = ["--data_path", "x", "--vocab_file", "tok.model", "--train_iters", "1"]
def parsed(*extra):
    return config_from_args(build_parser().parse_args([*BASE, *extra])).model

model = parsed("--model_name", "scaledllama", "--attention-scale", "0.5")
resolved = model.resolved()
stored = json.loads(json.dumps(dataclasses.asdict(resolved)))  # run_config.json's "model"
out = {
    "given": model.attention_scale,
    "default": ModelArgs(model_name="scaledllama").resolved().attention_scale,
    "other family": ModelArgs().resolved().attention_scale,
    "problems": family_setting_problems(model),
    "refused": family_setting_problems(parsed("--attention_scale", "0.5")),
    "checked": family_setting_problems(parsed("--model_name", "scaledllama",
                                              "--attention_scale", "-1")),
    "stored": stored["attention_scale"],
    "round trip": ModelArgs.from_dict(stored) == resolved,
    "shape check": setting_differences(resolved, ModelArgs(model_name="scaledllama").resolved()),
}
from megatron_ext.checkpointing.legacy.args import resolve_model_args
from megatron_ext.errors import CheckpointError
try:
    resolve_model_args({"model_name": "scaledllama"})
except CheckpointError as error:
    out["legacy"] = str(error)
from megatron_ext.models.builder import transformer_config
from megatron_ext.models.config import PrecisionArgs
from megatron_ext.parallel import ParallelArgs
out["softmax_scale"] = transformer_config(model, ParallelArgs(), PrecisionArgs()).softmax_scale
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_new_family_with_a_new_setting_is_one_file(tmp_path):
    """In a fresh process (ModelArgs takes its fields from the registry once): the setting
    is a flag, resolved to the family's default, refused by name for other families,
    checked by the family's own rule, stored and read back, compared by the shape check,
    refused by the legacy writer and handed to megatron-core by the builder."""
    (tmp_path / "scaledllama.py").write_text(NEW_FAMILY)
    result = subprocess.run([sys.executable, "-c", CHECKS, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["given"], out["default"], out["other family"], out["stored"]) == (
        0.5, 0.125, None, 0.5)
    assert out["problems"] == []
    assert out["refused"] == ["--attention_scale=0.5: the llama2 family has no such setting"]
    assert out["checked"] == ["--attention_scale -1.0 must be positive"]
    assert out["round trip"]
    assert out["shape check"] == ["--attention_scale: checkpoint 0.5, this run 0.125"]
    assert "the attention_scale setting (0.125)" in out["legacy"]
    assert out["softmax_scale"] == 0.5


def test_settings_are_declared_by_their_families():
    """Gemma 3's and Falcon's settings come from their files; no other family has them."""
    owners = {name: declared.families for name, declared in setting_fields().items()}
    moved = {"add_bias_linear": ("falcon",), "parallel_attn_norms": ("falcon",),
             "sliding_window_pattern": ("gemma3",), "rope_local_theta": ("gemma3",),
             "query_pre_attn_scalar": ("gemma3",)}
    assert {name: owners[name] for name in moved} == moved
    assert set(owners) <= {f.name for f in dataclasses.fields(ModelArgs)}
    for family in families().values():  # every family's defaults are valid
        assert family_setting_problems(ModelArgs(model_name=family.name)) == []


@pytest.mark.parametrize("family, values", [
    ("llama2", {"add_bias_linear": False, "parallel_attn_norms": 0,
                "sliding_window_pattern": 0, "rope_local_theta": None,
                "query_pre_attn_scalar": None}),
    ("gpt", {"add_bias_linear": True, "parallel_attn_norms": 0}),  # Family.add_bias_linear
    ("falcon", {"add_bias_linear": False, "parallel_attn_norms": 1,
                "sliding_window_pattern": 0}),
    ("gemma3", {"sliding_window_pattern": 6, "rope_local_theta": 10000.0,
                "parallel_attn_norms": 0}),
])
def test_resolved_settings_keep_their_stored_values(family, values):
    """run_config.json files already written hold these values at the model's top level."""
    resolved = dataclasses.asdict(ModelArgs(model_name=family).resolved())
    assert {key: resolved[key] for key in values} == values
    assert ModelArgs.from_dict(resolved).resolved() == ModelArgs(model_name=family).resolved()


def test_old_run_configs_without_settings_read_as_the_family_defaults():
    old = {"model_name": "falcon", "num_layers": 2}  # written before a setting existed
    assert ModelArgs.from_dict(old).resolved().parallel_attn_norms == 1
    assert setting_differences(ModelArgs.from_dict(old).resolved(),
                               ModelArgs(model_name="falcon", num_layers=2,
                                         parallel_attn_norms=2).resolved()) == [
        "--parallel_attn_norms: checkpoint 1, this run 2"]


def test_gemma3_settings_shape_its_layers():
    model = ModelArgs(model_name="gemma3", num_layers=4, sliding_window_size=8,
                      sliding_window_pattern=2, query_pre_attn_scalar=16).resolved()
    assert model.window_layers() == [True, False, True, False]
    assert model.mask_window is None  # the global layers attend everywhere
    assert model.settings.transformer_config(model) == {"window_attn_skip_freq": 2,
                                                        "softmax_scale": 0.25}
    every = ModelArgs(model_name="gemma3", sliding_window_size=8, sliding_window_pattern=0)
    assert every.mask_window == 8 and every.window_layers() == [True, True]


def test_llama_layout_export_refuses_family_settings():
    from megatron_ext.models.hf_llama import llama_config_from_model_args
    from megatron_ext.models.family import UnsupportedModelError

    model = ModelArgs(model_name="llama2", parallel_attn_norms=2).resolved()
    with pytest.raises(UnsupportedModelError, match="parallel_attn_norms=2"):
        llama_config_from_model_args(model, "llama", "LlamaForCausalLM", False, 100, 1, 2,
                                     None, "float32")
