"""Every model family builds and trains (single process); options that change the model run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from megatron_ext.models.families import family_names, get_family
from megatron_ext.models.family import EXAMPLE
from tests.runs import model_args, start_runs, started, starts_early, train_metrics

# options that are no family's own, spread over the families to be trained too (a family
# not named here is trained all the same: every family of the registry is)
SHARED_OPTIONS = {
    "llama3": ["--recompute_granularity", "selective"],
    "mistral": ["--recompute_granularity", "full"],
    "qwen2": ["--tie_embed_logits"],  # QKV biases, RMSNorm eps 1e-6, RoPE base 1e6
    "qwen3": ["--kv_channels", "24"],  # per-head q/k RMSNorm, head size != hidden / heads
    "gemma3": ["--num_attention_heads_kv", "1"],  # its defaults: 1 + w norms, GeGLU, ...
    # mixtures of experts (default 8, 128 and 64 experts): tests/*/test_moe*.py test them
    "mixtral": ["--num_experts", "4"],
    "olmoe": ["--num_experts", "4"],
    "qwen3_moe": ["--num_experts", "4", "--mlp_only_layers", "0"],  # + a dense layer
}


def family_args(name: str) -> list[str]:
    """The flags a family's tiny run trains with, from its record: its window (shorter than
    the rows) and each of its settings at the value its file offers as an example (Falcon's
    two norms and biases, Gemma 3's global layer every second one), then the shared
    options above."""
    family = get_family(name)
    args = ["--model_name", name]
    if family.sliding_window:
        args += ["--sliding_window_size", "16"]
    for field in dataclasses.fields(family.settings):
        example = field.metadata.get(EXAMPLE)
        if example is True:
            args.append(f"--{field.name}")
        elif example is not None and example is not False:
            args += [f"--{field.name}", str(example)]
    return args + SHARED_OPTIONS.get(name, [])


@starts_early("family_runs")
def start_family_runs(request):
    """One 4-iteration run per family of the registry, all in one batch."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("families")
    train_data = request.getfixturevalue("train_data")
    return root, start_runs(1, [{"name": family, "argv": model_args(train_data, 4) + [
        *family_args(family), "--save", str(root / family),
        "--tensorboard_dir", str(root / family / "tb")]} for family in family_names()],
        root / "launch", early=True)


@pytest.fixture(scope="module")
def family_runs(request):
    root, launch = started("family_runs", request)
    return root, launch.wait()


@pytest.mark.slow
@pytest.mark.parametrize("family", family_names())
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
