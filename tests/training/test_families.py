"""Every model family builds and trains (single process); options that change the model run."""

from __future__ import annotations

import json
import math

import pytest

from tests.runs import model_args, start_runs, started, starts_early, train_metrics

FAMILY_ARGS = {
    "llama3": ["--recompute_granularity", "selective"],
    "mistral": ["--sliding_window_size", "16", "--recompute_granularity", "full"],
    "falcon": ["--parallel_attn_norms", "2", "--add_bias_linear"],  # parallel layers
    "gpt": [],  # LayerNorm, GeLU, learned positions, biases, tied embeddings
    "qwen2": ["--tie_embed_logits"],  # QKV biases, RMSNorm eps 1e-6, RoPE base 1e6
    "qwen3": ["--kv_channels", "24"],  # per-head q/k RMSNorm, head size != hidden / heads
    "gemma3": ["--sliding_window_size", "16", "--sliding_window_pattern", "2",
               "--num_attention_heads_kv", "1"],  # its defaults: 1 + w norms, GeGLU, ...
}


@starts_early("family_runs")
def start_family_runs(request):
    """One 4-iteration run per family, all in one batch."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("families")
    train_data = request.getfixturevalue("train_data")
    return root, start_runs(1, [{"name": family, "argv": model_args(train_data, 4) + [
        "--model_name", family, *FAMILY_ARGS[family], "--save", str(root / family),
        "--tensorboard_dir", str(root / family / "tb")]} for family in sorted(FAMILY_ARGS)],
        root / "launch", early=True)


@pytest.fixture(scope="module")
def family_runs(request):
    root, launch = started("family_runs", request)
    return root, launch.wait()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_ARGS))
def test_family_trains(family_runs, family):
    root, results = family_runs
    tmp_path, result = root / family, results[family]
    assert result.returncode == 0, result.log[-3000:]
    train = train_metrics(tmp_path)
    assert len(train) == 4 and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert "validation at iter 4" in result.log
    assert (tmp_path / "iter_0000004").is_dir()
    run_config = json.loads((tmp_path / "iter_0000004" / "run_config.json").read_text())
    assert run_config["model"]["model_name"] == family
