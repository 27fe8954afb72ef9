"""The run plan is resolved in one step, from the flags and the checkpoints' metadata, without
torch: what to load, which parts, the model's shape, the tokenizer, the adapters, the resume.

The checkpoints here are their metadata only (tracker, ``iter_*/run_config.json``, a weights
file for the adapters' base identity): the plan reads nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ext.errors import CheckpointError
from megatron_ext.training.arguments import build_parser, config_from_args
from megatron_ext.training.plan import resolve
from tests.conftest import REPO

BASE = ["--data_path", "data/x", "--vocab_file", "tok.model", "--train_iters", "2"]
SHAPE = {"model_name": "llama2", "num_layers": 3, "hidden_size": 48,
         "num_attention_heads": 6, "num_attention_heads_kv": 2, "seq_length": 4096}


def config(*extra):
    return config_from_args(build_parser().parse_args([*BASE, *extra]))


def fake_checkpoint(root, iteration=5, *, model=None, tokenizer=None, peft=None, base=None,
                    precision=None, parallel=None):
    """A dist checkpoint's metadata: the tracker and the run config of ``iter_*``."""
    directory = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(directory, exist_ok=True)
    run_config = {"model": dict(model or SHAPE),
                  "tokenizer": tokenizer or {"tokenizer_type": "SentencePieceTokenizer",
                                             "vocab_file": "tok.model"},
                  "tokenizer_identity": {"sha256": "abc", "vocab_size": 100}}
    if peft is not None:
        run_config["peft"], run_config["base"] = peft, base
    if precision is not None:
        run_config["precision"], run_config["parallel"] = precision, parallel or {}
    with open(os.path.join(directory, "run_config.json"), "w") as handle:
        json.dump(run_config, handle)
    with open(os.path.join(directory, "weights.bin"), "wb") as handle:
        handle.write(os.urandom(64))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(str(iteration))
    return str(root)


def test_from_scratch_loads_nothing():
    plan = resolve(config("--save", "out"), world_size=1)
    assert plan.load is None and plan.peft is None and plan.resumed_from is None
    assert plan.parts == "all" and not plan.continues_logs
    assert "from scratch" in plan.summary() and "saves to out" in plan.summary()


def test_finetune_takes_the_shape_and_weights_only(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "base")
    plan = resolve(config("--load", ckpt, "--finetune", "--use_checkpoint_args",
                          "--seq_length", "128"), world_size=1)
    m = plan.config.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads_kv) == (3, 48, 2)
    assert m.seq_length == 128  # a data setting: this run's, not the checkpoint's
    assert plan.load == ckpt and plan.weights_only and plan.resumed_from is None
    assert plan.saved_tokenizer == {"sha256": "abc", "vocab_size": 100}
    assert "weights only from" in plan.summary()


def test_resume_of_another_checkpoint_is_full(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "run")
    plan = resolve(config("--load", ckpt, "--save", str(tmp_path / "new")), world_size=1)
    assert plan.load == ckpt and not plan.weights_only and plan.resumed_from == ckpt
    assert plan.continues_logs and "(full resume)" in plan.summary()


def test_auto_resume_prefers_the_runs_own_checkpoint(tmp_path):
    base = fake_checkpoint(tmp_path / "base")
    save = str(tmp_path / "save")
    first = resolve(config("--load", base, "--finetune", "--save", save, "--auto_resume"),
                    world_size=1)
    assert first.load == base and first.weights_only and not first.steps
    fake_checkpoint(save, iteration=7)
    again = resolve(config("--load", base, "--finetune", "--save", save, "--auto_resume"),
                    world_size=1)
    assert again.load == save and not again.weights_only and again.resumed_from == save
    assert again.config.checkpoint.use_checkpoint_args
    assert any("--auto_resume" in step for step in again.steps)
    assert "--auto_resume" in again.summary()


def test_the_first_launch_of_the_resume_idiom_may_find_nothing(tmp_path):
    save = str(tmp_path / "save")
    plan = resolve(config("--load", save, "--save", save, "--use_checkpoint_args"),
                   world_size=1)
    assert plan.allow_missing and plan.config.model.num_layers == 2  # the flags' shape
    assert any("first launch" in step for step in plan.steps)


def test_a_model_to_import_brings_its_shape_and_tokenizer(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    imported = fake_checkpoint(tmp_path / "cache" / "entry", iteration=0, tokenizer={
        "tokenizer_type": "HFTokenizer", "vocab_file": "tokenizer"})
    os.makedirs(os.path.join(imported, "tokenizer"))  # the import copies it beside the weights
    seen = []

    def importer(checkpoint, tokenizer):
        seen.append((checkpoint.load, checkpoint.import_cache_dir))
        return imported, json.load(open(os.path.join(imported, "iter_0000000",
                                                     "run_config.json")))

    args = ["--data_path", "d", "--train_iters", "1", "--load", str(hf),
            "--import_cache_dir", str(tmp_path / "cache")]
    plan = resolve(config_from_args(build_parser().parse_args(args)), world_size=1,
                   importer=importer)
    assert seen == [(str(hf), str(tmp_path / "cache"))]
    assert plan.load == imported and plan.weights_only
    assert plan.config.tokenizer.tokenizer_type == "HFTokenizer"
    assert plan.config.tokenizer.vocab_file == os.path.join(imported, "tokenizer")
    assert plan.config.model.hidden_size == 48
    assert "is a model to import" in plan.summary()


def test_adapters_fresh_then_resumed_from_save(tmp_path):
    base = fake_checkpoint(tmp_path / "base")
    save = str(tmp_path / "lora")
    flags = ("--load", base, "--save", save, "--peft", "lora", "--peft_dim", "4")
    fresh = resolve(config(*flags), world_size=1)
    assert fresh.peft is not None and fresh.peft.resume is None
    assert fresh.load == base and fresh.weights_only and fresh.parts == "adapters"
    assert fresh.peft.targets and fresh.config.model.hidden_size == 48
    assert not fresh.continues_logs
    # the run saved its adapters: the same command resumes them
    settings = fresh.config.peft.settings(fresh.peft.targets)
    fake_checkpoint(save, iteration=3, peft=settings, base=fresh.peft.record)
    again = resolve(config(*flags), world_size=1)
    assert again.peft.resume == save and again.continues_logs
    assert "resumed from" in again.summary()
    # other adapter settings into the same --save are refused, naming the difference
    with pytest.raises(CheckpointError, match="dim: checkpoint 4, this run 8"):
        resolve(config("--load", base, "--save", save, "--peft", "lora", "--peft_dim", "8"),
                world_size=1)
    # --load of the adapters: their recorded base, their settings, their progress
    loaded = resolve(config("--load", save, "--save", str(tmp_path / "more")), world_size=1)
    assert loaded.load == base and loaded.peft.resume == save
    assert loaded.config.peft.peft_dim == 4


def test_validation_runs_on_the_resolved_plan(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "base")  # 6 heads: TP 4 cannot split them
    with pytest.raises(Exception, match="--num_attention_heads 6 is not divisible"):
        resolve(config("--load", ckpt, "--finetune", "--use_checkpoint_args",
                       "--tensor_model_parallel_size", "4"), world_size=4)


def test_resolving_imports_no_torch(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "base")
    save = str(tmp_path / "save")
    fake_checkpoint(save)
    code = (
        "import sys\n"
        "from megatron_ext.training.arguments import build_parser, config_from_args\n"
        "from megatron_ext.training.plan import resolve\n"
        f"argv = {BASE!r} + ['--load', {ckpt!r}, '--save', {save!r}, '--auto_resume', "
        "'--peft', 'lora']\n"
        "plan = resolve(config_from_args(build_parser().parse_args(argv)), world_size=1)\n"
        "assert plan.peft is not None, plan\n"
        "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("saved,flags,differs", [
    ({"bf16": False}, ["--bf16"], "precision: checkpoint fp32, this run bf16"),
    ({"bf16": True}, [], "precision: checkpoint bf16, this run fp32"),
    ({"fp16": True}, ["--bf16"], "precision: checkpoint fp16, this run bf16"),
])
def test_resuming_another_precision_or_optimizer_is_refused(tmp_path, saved, flags, differs):
    """The optimizer state of one precision (or optimizer) does not load into another:
    a full resume is refused before any work, saying what differs and what to do."""
    ckpt = fake_checkpoint(tmp_path / "run", precision=saved)
    with pytest.raises(CheckpointError) as error:
        resolve(config("--load", ckpt, *flags), world_size=1)
    assert differs in str(error.value) and "--finetune" in str(error.value)


def test_plain_and_distributed_optimizer_state_do_not_mix_on_resume(tmp_path):
    plain = fake_checkpoint(tmp_path / "plain", precision={},
                            parallel={"use_distributed_optimizer": False})
    with pytest.raises(CheckpointError, match="optimizer: checkpoint plain, this run "
                                              "distributed.*resume it with neither --bf16 nor "
                                              "--fp16 and no --use_distributed_optimizer"):
        resolve(config("--load", plain, "--use_distributed_optimizer"), world_size=1)
    dist = fake_checkpoint(tmp_path / "dist", precision={"bf16": True},
                           parallel={"use_distributed_optimizer": True})
    with pytest.raises(CheckpointError, match="optimizer: checkpoint distributed, this run plain"):
        resolve(config("--load", dist, "--bf16"), world_size=1)
    # the same kind resumes; another kind starts from the weights (--finetune)
    assert resolve(config("--load", dist, "--bf16", "--use_distributed_optimizer"),
                   world_size=1).resumed_from == dist
    plan = resolve(config("--load", plain, "--bf16", "--use_distributed_optimizer",
                          "--finetune"), world_size=1)
    assert plan.weights_only and plan.load == plain
