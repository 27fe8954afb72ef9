"""LoRA/DoRA adapters against Hugging Face ``peft``: trained from a Hugging Face model
(``finetune.py --load HF_DIR --peft ...``), exported with ``--adapter_only`` and loaded by
``peft.PeftModel.from_pretrained`` they give our logits; the merged export equals peft's
``merge_and_unload()``; ``merge_lora``, generation and evaluation load base plus adapters.

Runs: one process (three trainings, then the tools, in order) and two processes (the
adapted model's logits at TP=2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import CHATML, SAMPLE
from tests.runs import job_logits, logits_job, start_runs, tool_job

pytestmark = pytest.mark.slow

EXTRA = ",".join(CHATML)


def run_args(prefix: str, load: Path, save: Path, iters: int = 3) -> list[str]:
    return ["--data_path", prefix, "--split", "90,10,0", "--vocab_extra_ids_list", EXTRA,
            "--seq_length", "96", "--variable_seq_lengths", "--pack_sequences",
            "--micro_batch_size", "2", "--global_batch_size", "8", "--train_iters", str(iters),
            "--lr", "1e-2", "--eval_iters", "1", "--seed", "1234", "--load", str(load),
            "--save", str(save)]


def reshard_job(name: str, *argv: str) -> dict:
    """checkpoint_util.py merge_lora (a tool without --no_progress)."""
    job = tool_job(name, "checkpoint_util.py", "merge_lora", *argv)
    job["argv"].remove("--no_progress")
    return job


def tokens(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (2, 24), generator=generator)


@pytest.fixture(scope="module")
def peft_exports(tmp_path_factory, hf_llama, hf_variants, imported_train_data) -> dict:
    import sentencepiece

    root = tmp_path_factory.mktemp("peft_export")
    prefix = imported_train_data["prefix"]
    vocab = sentencepiece.SentencePieceProcessor(
        model_file=imported_train_data["vocab_file"]).get_piece_size()
    ids = tokens(vocab)
    bases = {"lora": hf_llama, "dora": hf_variants["qwen2"],
             "dora-tied": hf_variants["llama-tied"], "step0": hf_llama}
    runs = [
        # LoRA, default targets (megatron-core names)
        {"name": "lora", "argv": run_args(prefix, hf_llama, root / "lora") + ["--peft", "lora"]},
        # DoRA on Qwen2 (tied embeddings, q/k/v biases) with Hugging Face target names
        {"name": "dora", "argv": run_args(prefix, hf_variants["qwen2"], root / "dora") + [
            "--peft", "dora", "--peft_target_modules", "*_proj", "--peft_dim", "8",
            "--lora_A_init", "xavier"]},
        # DoRA on a tied Llama (Llama 3.2 / SmolLM2 style), some Hugging Face names: q_proj
        # selects the fused q/k/v layer (exported as q, k and v adapters)
        {"name": "dora-tied", "argv": run_args(prefix, hf_variants["llama-tied"],
                                               root / "dora-tied") + [
            "--peft", "dora", "--peft_target_modules", "q_proj,down_proj"]},
        # no update (lr 0): the adapters as initialised, A random, B zero, DoRA's magnitude
        {"name": "step0", "argv": run_args(prefix, hf_llama, root / "step0", iters=1) + [
            "--peft", "dora", "--lr", "0"]},
    ]
    for name in bases:
        runs.append(tool_job(f"{name}-adapter", "megatron_to_hf.py", "--load", str(root / name),
                             "--out", str(root / f"{name}-adapter"), "--adapter_only"))
    # the merged exports (a qwen2 model exports only with a Qwen-style tokenizer; the tiny
    # one carries a tokenizer.model)
    for name in ("lora", "dora-tied"):
        runs.append(tool_job(f"{name}-merged", "megatron_to_hf.py", "--load", str(root / name),
                             "--out", str(root / f"{name}-merged")))
    logits = {name: logits_job(f"{name}-logits", root / name, ids, root / "logits")
              for name in bases}
    runs += list(logits.values())
    runs += [reshard_job("merge_lora", "--load", str(root / "dora"), "--out",
                         str(root / "dora-unsharded")),
             reshard_job("merge_lora-full", "--load", str(hf_llama), "--out",
                         str(root / "refused"))]
    unsharded = logits_job("unsharded-logits", root / "dora-unsharded", ids, root / "logits")
    runs.append(unsharded)
    runs.append(tool_job("generate", "generate.py", "--load", str(root / "lora"), "--prompt",
                         "What is the capital of France?", "--greedy", "--max_new_tokens", "6"))
    runs.append(tool_job("evaluate", "evaluate.py", "--load", str(root / "dora"), "--input",
                         str(SAMPLE / "test.jsonl"), "--question_key", "question",
                         "--answer_key", "answer", "--no_generate",
                         "--summary_json", str(root / "eval.json")))
    serial = start_runs(1, runs, root / "serial")
    results = serial.wait()
    tp2 = logits_job("dora-tp2", root / "dora", ids, root / "logits", tp=2)
    results.update(start_runs(2, [tp2], root / "tp2").wait())
    return {"root": root, "results": results, "ids": ids, "bases": bases,
            "ours": {name: job_logits(results, job) for name, job in logits.items()},
            "unsharded": job_logits(results, unsharded), "tp2": job_logits(results, tp2)}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def peft_model(base: Path, adapter: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("name", ["lora", "dora", "dora-tied", "step0"])
def test_exported_adapter_in_peft_gives_our_logits(peft_exports, name):
    import json

    root, ids = peft_exports["root"], peft_exports["ids"]
    result = peft_exports["results"][f"{name}-adapter"]
    assert result.returncode == 0, result.log[-3000:]
    config = json.loads((root / f"{name}-adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == (name != "lora")
    if name == "dora":
        assert config["r"] == 8 and sorted(config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if name == "dora-tied":
        assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    model = peft_model(peft_exports["bases"][name], root / f"{name}-adapter")
    with torch.no_grad():
        theirs = model(ids).logits
    ours = peft_exports["ours"][name][..., :theirs.shape[-1]]
    assert relative_error(ours, theirs) <= 1e-4
    if name == "step0":  # untrained adapters compute the base model exactly
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(
            peft_exports["bases"][name], dtype=torch.float32)
        base.config._attn_implementation = "eager"
        with torch.no_grad():
            plain = base.eval()(ids).logits
        assert relative_error(theirs, plain) <= 1e-6
    elif name == "lora":  # the trained adapters moved the model away from its base
        assert relative_error(ours, peft_exports["ours"]["step0"][..., :theirs.shape[-1]]) > 1e-3


@pytest.mark.parametrize("name", ["lora", "dora-tied"])
def test_merged_export_equals_peft_merge_and_unload(peft_exports, name):
    import transformers

    root, ids = peft_exports["root"], peft_exports["ids"]
    result = peft_exports["results"][f"{name}-merged"]
    assert result.returncode == 0, result.log[-3000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / f"{name}-merged",
                                                               dtype=torch.float32)
    merged.config._attn_implementation = "eager"
    assert not any("lora" in key for key in merged.state_dict())
    unloaded = peft_model(peft_exports["bases"][name], root / f"{name}-adapter").merge_and_unload()
    with torch.no_grad():
        want = unloaded(ids).logits
        got = merged.eval()(ids).logits[..., :want.shape[-1]]
    assert relative_error(got, want) <= 1e-4


def test_merge_lora_and_tp2_loading_give_the_adapted_logits(peft_exports):
    results = peft_exports["results"]
    assert results["merge_lora"].returncode == 0, results["merge_lora"].log[-3000:]
    ours = peft_exports["ours"]["dora"]
    assert relative_error(peft_exports["unsharded"], ours) <= 1e-5
    assert relative_error(peft_exports["tp2"], ours) <= 1e-5
    refused = results["merge_lora-full"]
    assert refused.returncode == 1 and "not an adapter checkpoint" in refused.log


def test_generate_and_evaluate_load_base_plus_adapters(peft_exports):
    import json
    import math

    result = peft_exports["results"]["generate"]
    assert result.returncode == 0, result.log[-3000:]
    assert result.stdout.strip()
    evaluated = peft_exports["results"]["evaluate"]
    assert evaluated.returncode == 0, evaluated.log[-3000:]
    summary = json.loads((peft_exports["root"] / "eval.json").read_text())
    assert math.isfinite(summary["answer_loss"]) and summary["records"] > 0
