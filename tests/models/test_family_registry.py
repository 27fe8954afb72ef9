"""The family registry is derived from the files in models/families/, and stays light."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import megatron_ext.models.families as registry
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import (
    closest_family,
    families,
    family_for_hf_config,
    family_for_legacy_name,
    family_names,
    get_family,
)
from megatron_ext.models.family import Family
from tests.conftest import REPO


def test_every_family_file_defines_its_family():
    files = sorted(m.name for m in pkgutil.iter_modules(registry.__path__)
                   if not m.name.startswith("_"))
    assert list(family_names()) == files
    for name, family in families().items():
        assert isinstance(family, Family) and family.name == name
        assert family.legacy_name and family.normalization in ("RMSNorm", "LayerNorm")
        assert family.default_ffn_hidden_size(64) > 0
        assert family.hf is None or family.hf.model_type


def documented_family_example() -> str:
    """The example family file of docs/architecture.md's "Adding a model family"."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = text.index("# megatron_ext/models/families/longllama.py")
    return text[start:text.index("```", start)]


def test_a_new_file_is_a_new_family(tmp_path, monkeypatch):
    """docs/architecture.md's example, dropped in as one file, is a family everywhere."""
    (tmp_path / "longllama.py").write_text(documented_family_example())
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    registry._discovered.cache_clear()
    try:
        assert "longllama" in family_names()
        assert ModelArgs(model_name="longllama").resolved().rope_theta == 2e6
        assert family_for_hf_config({"model_type": "longllama"}).name == "longllama"
        assert family_for_legacy_name("llama2").name == "llama2"  # not taken over
    finally:
        monkeypatch.undo()
        registry._discovered.cache_clear()
        sys.modules.pop("megatron_ext.models.families.longllama", None)
    assert "longllama" not in family_names()


def test_registry_config_and_layout_import_neither_torch_nor_megatron():
    code = ("import sys\n"
            "import megatron_ext.models.families as f, megatron_ext.models.config, "
            "megatron_ext.parallel\n"
            "f.families()\n"
            "print(sorted(m for m in ('torch', 'megatron', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("theta", [10000.0, 12345.0, 500000.0, 1e6, 2e6])
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-4])
def test_exactly_one_family_claims_each_hf_config(model_type, theta, eps):
    config = {"model_type": model_type, "rope_theta": theta, "rms_norm_eps": eps}
    # the rules this replaced: Mistral by type; CodeLlama's base; 500000 and up: Llama 3;
    # then Llama 1 by its epsilon
    want = ("mistral" if model_type == "mistral" else "codellama" if theta == 1e6
            else "llama3" if theta >= 500000.0 else "llama" if eps <= 1e-6 else "llama2")
    assert family_for_hf_config(config).name == want
    assert family_for_hf_config({**config, "model_type": "qwen2"}).name == "qwen2"
    assert family_for_hf_config({**config, "model_type": "gemma2"}) is None


LLAMA = {"normalization": "RMSNorm", "swiglu": True, "position_embedding": "rope",
         "tie_embeddings": False}
GPT = {"normalization": "LayerNorm", "swiglu": False, "position_embedding": "learned_absolute",
       "tie_embeddings": True}


@pytest.mark.parametrize("theta", [10000.0, 12345.0, 500000.0, 1e6])
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-4])
@pytest.mark.parametrize("window", [False, True])
def test_legacy_guess_from_the_architecture(theta, eps, window):
    # the rules this replaced: a window means Mistral; CodeLlama's or Llama 3's base; then
    # Llama 1 by its epsilon, else Llama 2
    want = ("mistral" if window else "codellama" if theta == 1e6 else "llama3"
            if theta == 500000.0 else "llama" if eps == 1e-6 else "llama2")
    assert closest_family(LLAMA, theta, eps, window, prefer="llama2").name == want
    assert closest_family(GPT, theta, eps, window, prefer="llama2").name == "gpt"
    assert closest_family({**GPT, "swiglu": True}, theta, eps, window, "llama2") is None


def test_legacy_names():
    assert get_family("llama3").legacy_name == "llama2"
    assert {name: family_for_legacy_name(name).name
            for name in ("llama", "llama2", "codellama", "mistral", "gpt")} == {
        "llama": "llama", "llama2": "llama2", "codellama": "codellama", "mistral": "mistral",
        "gpt": "gpt"}
    # Megatron-LLM's Falcon is ours by name (its reader still refuses parallel_attn args)
    assert family_for_legacy_name("falcon").name == "falcon"


def test_resolved_fills_family_defaults_once():
    got = ModelArgs(model_name="codellama", hidden_size=64, seq_length=128).resolved()
    assert (got.rope_theta, got.layernorm_epsilon, got.ffn_hidden_size, got.num_attention_heads_kv,
            got.max_position_embeddings, got.sliding_window_size) == (1e6, 1e-5, 176, 4, 128, None)
    assert ModelArgs(model_name="mistral").resolved().sliding_window_size == 4096
    assert ModelArgs(model_name="mistral", sliding_window_size=0).resolved().sliding_window_size == 0
    assert ModelArgs(model_name="mistral", sliding_window_size=0).attention_window is None
    assert ModelArgs.from_dict({"model_name": "gpt", "unknown": 1}).model_name == "gpt"


def test_gguf_architectures_come_from_the_family_files():
    """Each llama.cpp architecture the importer reads is declared by one family, as the
    Hugging Face model_type its file becomes (llama.cpp's llama covers five families)."""
    layouts = registry.gguf_layouts()
    assert sorted(layouts) == ["falcon", "gemma3", "llama", "qwen2", "qwen3", "qwen3moe"]
    assert {arch: layout.model_type for arch, layout in layouts.items()} == {
        "falcon": "falcon", "gemma3": "gemma3_text", "llama": "llama", "qwen2": "qwen2",
        "qwen3moe": "qwen3_moe",
        "qwen3": "qwen3"}
    for layout in layouts.values():  # the family claiming that model_type reads the file
        assert registry.family_for_hf_config(
            {"model_type": layout.model_type, "rope_theta": 10000.0}) is not None
