"""Architectures that no family in models/families claims train on the hf backend, chosen
by ``--backend auto``: each trains, resumes (``--auto_resume``) on its straight curve, and
exports a model that transformers loads with our validation loss. Those of
:data:`ADAPTED` train a LoRA on ``*_proj`` instead of every weight: the same runs export
both the merged model and the PEFT adapter, which peft loads with our logits.

Cost: one one-process batch, started early: per architecture a straight run (2 steps,
a checkpoint each), its copy rewound to step 1 and resumed, and the export (and the
adapter's)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpointing.tracker import write_tracker
from tests.runs import CHATML, call_job, start_runs, started, starts_early, tool_job, train_metrics
from tests.training.hf_models import ARCHITECTURES, make_tiny_model
from tests.training.test_hf_backend import hf_args

pytestmark = pytest.mark.slow
ITERS = 2
ADAPTED = ("phi3", "qwen2_moe", "smollm3", "cohere")
"""The architectures trained with LoRA on ``*_proj`` (their attention and MLP projections;
qwen2_moe's shared expert, not its fused experts); the others (granite, olmo2) train every
weight."""
LORA = ("--peft", "lora", "--peft_dim", "8", "--peft_target_modules", "*_proj")


def rewind(run: str, copy: str, iteration: str) -> None:
    """A copy of the run directory ``run`` whose tracker names ``iteration``, the later
    checkpoints gone: what a run stopped there leaves (a pool job between two runs)."""
    shutil.copytree(run, copy)
    for name in os.listdir(copy):
        if name.startswith("iter_") and int(name[5:]) > int(iteration):
            shutil.rmtree(os.path.join(copy, name))
    write_tracker(copy, int(iteration))


@starts_early("architecture_runs")
def start_architecture_runs(request):
    root = request.getfixturevalue("tmp_path_factory").mktemp("architectures")
    data = request.getfixturevalue("imported_train_data")
    sp_model = request.getfixturevalue("sp_model")
    jobs = []
    for arch in ARCHITECTURES:
        model = make_tiny_model(root / "models" / arch, sp_model, arch)
        straight, resumed = root / arch, root / f"{arch}-resumed"
        args = ["--train_iters", str(ITERS), "--save_interval", "1",
                *(LORA if arch in ADAPTED else ())]
        jobs += [{"name": arch, "argv": hf_args(data, model, straight, *args)},
                 call_job(f"{arch}-rewind", f"{__name__}:rewind", str(straight), str(resumed),
                          "1"),
                 {"name": f"{arch}-resume", "argv": hf_args(data, model, resumed, *args,
                                                            "--auto_resume")},
                 tool_job(f"{arch}-export", "megatron_to_hf.py", "--load", str(straight),
                          "--out", str(root / f"{arch}-hf"))]
        if arch in ADAPTED:
            jobs.append(tool_job(f"{arch}-adapter", "megatron_to_hf.py", "--load",
                                 str(straight), "--out", str(root / f"{arch}-adapter"),
                                 "--adapter_only"))
    return root, start_runs(1, jobs, root / "launch", early=True)


@pytest.fixture(scope="module")
def architecture_runs(request) -> tuple[Path, dict]:
    root, launch = started("architecture_runs", request)
    return root, launch.wait()


def validation_loss(model, data: dict) -> float:
    """The trainer's validation loss (its first global batch of 8) of ``model`` (a
    transformers or peft model), computed here with our batches."""
    from megatron_ext.training.config import DataArgs
    from megatron_ext.training.data import BatchBuilder, build_splits
    from megatron_ext.training.hf_trainer import token_losses
    from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", data["vocab_file"],
                                                CHATML, megatron_llm_specials=False))
    split = build_splits(DataArgs(data_path=(data["prefix"],), split="90,10,0"), 1234)["valid"]
    batches = BatchBuilder(96, tokenizer.pad_id or 0, 0.0, True, 2, 0, 1)
    gb = batches.global_batch(split, 0, 8)
    weighted = 0.0
    with torch.no_grad():
        for mb in gb.micro_batches:
            logits = model(input_ids=mb.tokens, position_ids=mb.position_ids,
                           use_cache=False).logits
            weighted += float((token_losses(logits, mb.labels) * mb.loss_weights).sum())
    return weighted / gb.total_weight


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_without_a_family_trains_resumes_and_exports(
        architecture_runs, imported_train_data, arch):
    import transformers

    root, results = architecture_runs
    for job in ("", "-rewind", "-resume", "-export", *(("-adapter",) if arch in ADAPTED
                                                        else ())):
        assert results[arch + job].returncode == 0, results[arch + job].log[-3000:]
    log = results[arch].log
    assert f"no family in models/families claims model_type '{arch}'" in log
    straight = train_metrics(root / arch)
    assert [r["iteration"] for r in straight] == list(range(1, ITERS + 1))
    assert straight[-1]["loss"] < straight[0]["loss"] + 0.5  # it trains, nothing diverges
    assert "holds a checkpoint of the hf backend: resuming it" in results[f"{arch}-resume"].log
    resumed = train_metrics(root / f"{arch}-resumed")
    assert [(r["iteration"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["iteration"], r["loss"], r["grad_norm"]) for r in straight]
    ours = train_metrics(root / arch, "valid")[-1]["loss"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / f"{arch}-hf",
                                                               dtype=torch.float32)
    assert validation_loss(merged, imported_train_data) == pytest.approx(ours, rel=1e-5)
    run_config = json.loads((root / arch / "iter_0000002" / "run_config.json").read_text())
    if arch not in ADAPTED:
        assert "base" not in run_config  # every weight trained (no base to adapt)
        return
    # the adapter: peft's layout on the untouched base gives the merged model's logits
    import peft

    targets = run_config["peft"]["targets"]
    assert {"o_proj", "down_proj"} <= set(targets), targets
    assert all(name.endswith("_proj") for name in targets), targets
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "models" / arch,
                                                             dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, root / f"{arch}-adapter").eval()
    assert not (root / f"{arch}-adapter" / "model.safetensors").exists()
    assert validation_loss(adapted, imported_train_data) == pytest.approx(ours, rel=1e-5)
    tokens = torch.randint(0, 1500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, want = adapted(tokens).logits, merged.eval()(tokens).logits
        with adapted.disable_adapter():
            untrained = adapted(tokens).logits
    assert (theirs - want).abs().max() < 1e-4 * want.abs().max()
    assert (untrained - want).abs().max() > 1e-3 * want.abs().max()  # the adapter trained
