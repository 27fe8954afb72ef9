"""Architectures that no family in models/families claims train on the hf backend, chosen
by ``--backend auto``: each trains; a run stopped by SIGTERM (the trainer's own handler:
it saves, then stops) resumes (``--auto_resume``) on the straight curve; the checkpoint
evaluates and generates with tools/evaluate.py (the launcher's evaluation step); and it
exports a model that transformers loads with our validation loss. Those of
:data:`ADAPTED` train a LoRA on ``*_proj`` instead of every weight: the same runs export
both the merged model and the PEFT adapter, which peft loads with our logits. The
launcher plans each of them on the hf backend (tests/launch/test_sft_hf_backend.py; its
experiments "b" and "c" run a Phi-3 end to end, SIGTERM and relaunch included).

Cost: one one-process batch, started early: per architecture a straight run (2 steps,
a checkpoint each), a run stopped by SIGTERM after step 1 and its resumption, the
evaluation, and the export (and the adapter's)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import SAMPLE
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


EVAL_RECORDS = 3  # of data/sample/test.jsonl, for tools/evaluate.py


def train_until_sigterm(argv: list[str], after: str) -> None:
    """Train ``argv`` as finetune.py does and send this process SIGTERM once ``after``
    steps are logged: the trainer's own handler (installed by ``train()``) makes it save
    and stop after that step, as it does when a scheduler preempts a launch. A pool job:
    the worker's own SIGTERM disposition comes back afterwards."""
    from megatron_ext.training.arguments import parse_config
    from megatron_ext.training.backends import make_trainer

    trainer = make_trainer(parse_config(argv))
    log = trainer._log

    def log_then_signal(step: dict) -> None:
        log(step)
        if trainer.iteration >= int(after):
            os.kill(os.getpid(), signal.SIGTERM)

    trainer._log = log_then_signal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)


@starts_early("architecture_runs")
def start_architecture_runs(request):
    root = request.getfixturevalue("tmp_path_factory").mktemp("architectures")
    data = request.getfixturevalue("imported_train_data")
    sp_model = request.getfixturevalue("sp_model")
    records = root / "test.jsonl"
    records.write_text("".join((SAMPLE / "test.jsonl").read_text(encoding="utf-8")
                               .splitlines(keepends=True)[:EVAL_RECORDS]), encoding="utf-8")
    jobs = []
    for arch in ARCHITECTURES:
        model = make_tiny_model(root / "models" / arch, sp_model, arch)
        straight, resumed = root / arch, root / f"{arch}-resumed"
        args = ["--train_iters", str(ITERS), "--save_interval", "1",
                *(LORA if arch in ADAPTED else ())]
        jobs += [{"name": arch, "argv": hf_args(data, model, straight, *args)},
                 call_job(f"{arch}-stopped", f"{__name__}:train_until_sigterm",
                          hf_args(data, model, resumed, *args), "1"),
                 {"name": f"{arch}-resume", "argv": hf_args(data, model, resumed, *args,
                                                            "--auto_resume")},
                 tool_job(f"{arch}-evaluate", "evaluate.py", "--load", str(straight),
                          "--input", str(records), "--max_new_tokens", "4", "--batch_size",
                          "8", "--summary_json", str(root / f"{arch}-eval.json")),
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
    for job in ("", "-stopped", "-resume", "-evaluate", "-export",
                *(("-adapter",) if arch in ADAPTED else ())):
        assert results[arch + job].returncode == 0, results[arch + job].log[-3000:]
    log = results[arch].log
    assert f"no family in models/families claims model_type '{arch}'" in log
    straight = train_metrics(root / arch)
    assert [r["iteration"] for r in straight] == list(range(1, ITERS + 1))
    assert straight[-1]["loss"] < straight[0]["loss"] + 0.5  # it trains, nothing diverges
    # SIGTERM after step 1: saved there and stopped (no final evaluation), then resumed
    assert "stopping after iteration 1 (signal 15)" in results[f"{arch}-stopped"].log
    assert (root / f"{arch}-resumed" / "latest_checkpointed_iteration.txt").exists()
    assert "holds a checkpoint of the hf backend: resuming it" in results[f"{arch}-resume"].log
    resumed = train_metrics(root / f"{arch}-resumed")
    assert [(r["iteration"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["iteration"], r["loss"], r["grad_norm"]) for r in straight]
    ours = train_metrics(root / arch, "valid")[-1]["loss"]
    # the launcher's evaluation step: answer loss over the records, and generation
    summary = json.loads((root / f"{arch}-eval.json").read_text())
    assert summary["records"] == EVAL_RECORDS and summary["answer_loss"] > 0, summary
    assert summary["scored"] == EVAL_RECORDS and "f1" in summary, summary  # generated
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
