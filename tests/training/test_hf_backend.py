"""The Hugging Face backend (``--backend hf``): the same runs as the megatron backend on
the same initial weights, FSDP2 at DP=2, packing, exact resume (at another DP size),
the export, and the errors that come before any process group.

Cost: one batch per world size, started early (Qwen2 and Gemma 3 add 8 short runs to
the one-process batch); the megatron runs here are the only ones of the suite that start
from the same Hugging Face weights as the hf runs, so they cannot be taken from another
module's batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.errors import ConfigError
from tests.conftest import SAMPLE
from tests.models.families.test_gemma3 import make_gemma3
from tests.runs import (
    CHATML,
    start_runs,
    started,
    starts_early,
    tool_job,
    train_metrics,
)
from tests.tools.conftest import hf_logits, make_hf_model

ITERS = 4
STOP = 2  # the stopped runs' --exit_interval
VARIANTS = {"recompute-compiled": ("--recompute_granularity", "full", "--compile",
                                    "--compile_backend", "aot_eager"),
            "bf16": ("--bf16",)}
# adapter runs: a constant learning rate, so that the reference loop needs no schedule
PEFT = ("--backend", "hf", "--peft_dim", "8", "--lr_warmup_iters", "0", "--lr_decay_style",
        "constant")


def hf_args(data: dict, model: Path, save: Path, *flags: str) -> list[str]:
    """The shared runs' flags (tests/runs.py model_args) with a Hugging Face model."""
    return ["--data_path", data["prefix"], "--split", "90,10,0",
            "--vocab_extra_ids_list", ",".join(CHATML), "--seq_length", "96",
            "--variable_seq_lengths", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--train_iters", str(ITERS), "--lr", "1e-3", "--lr_warmup_iters", "1",
            "--eval_iters", "1", "--seed", "1234", "--load", str(model), "--save", str(save),
            "--import_cache_dir", str(save.parent / "imports"), *flags]


CROSS = ("qwen2", "gemma3")
"""Families compared across backends besides Llama, one process, padded and packed: Qwen2's
q/k/v biases and tied embeddings; Gemma 3's sliding-window and global layers, ``1 + w``
norms, scaled embeddings, head size and attention scalar."""


def make_cross_model(root: Path, sp_model: str, family: str) -> Path:
    """The tiny ``family`` model of :data:`CROSS`, 2 layers, 1536 embedding rows."""
    if family == "gemma3":
        return make_gemma3(root / family, sp_model, num_hidden_layers=2, vocab_size=1536)
    return make_hf_model(root / family, sp_model, family, num_hidden_layers=2,
                         vocab_size=1536)


@starts_early("hf_runs")
def start_hf_runs(request):
    """Every run of this module but the resume: the one-process batch (each backend,
    padded and packed, on Llama and on each of :data:`CROSS`; adapters, recompute,
    compile, bf16), the two-process one (FSDP2 padded and packed on each model, TP=2) and the four-process one (TP=2 x DP=2 stopped at iteration 2,
    which the serial resume continues at TP=1, DP=1)."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("hf_runs")
    data = request.getfixturevalue("imported_train_data")
    model = request.getfixturevalue("hf_tiny_llama")
    models = {"": model, **{f"{family}-": make_cross_model(
        root / "models", request.getfixturevalue("sp_model"), family) for family in CROSS}}
    serial = [{"name": f"{family}{backend}{packed}", "argv": hf_args(
        data, source, root / f"{family}{backend}{packed}", "--backend", backend,
        *(["--pack_sequences"] if packed else []))}
        for family, source in models.items() for backend in ("megatron", "hf")
        for packed in ("", "-packed")]
    # adapters: LoRA on megatron-core's default names (mapped), stopped at 2 and resumed
    # by the same command; DoRA on a pattern
    lora = hf_args(data, model, root / "lora", *PEFT, "--peft", "lora")
    serial += [{"name": "lora-stop", "argv": lora + ["--exit_interval", str(STOP)]},
               {"name": "lora", "argv": lora},
               {"name": "dora", "argv": hf_args(data, model, root / "dora", *PEFT, "--peft",
                                                "dora", "--peft_target_modules", "*_proj")}]
    # per-layer activation recomputation, torch.compile (aot_eager: inductor's C++ build
    # costs ~45 s of CPU here) and the bf16 policy: two steps each
    serial += [{"name": name, "argv": hf_args(data, model, root / name, "--backend", "hf",
                                              "--train_iters", "2", *flags)}
               for name, flags in VARIANTS.items()]
    pair = [{"name": "dp2", "argv": hf_args(data, model, root / "dp2", "--backend", "hf")},
            {"name": "dp2-packed", "argv": hf_args(data, model, root / "dp2-packed",
                                                   "--backend", "hf", "--pack_sequences")},
            {"name": "tp2", "argv": hf_args(data, model, root / "tp2", "--backend", "hf",
                                            "--tensor_model_parallel_size", "2")}]
    # FSDP2 over two processes on each of CROSS too, padded and packed
    pair += [{"name": f"{family}dp2{packed}", "argv": hf_args(
        data, models[family], root / f"{family}dp2{packed}", "--backend", "hf",
        *(["--pack_sequences"] if packed else []))}
        for family in (f"{name}-" for name in CROSS) for packed in ("", "-packed")]
    # TP=2 (the model's tp_plan) x FSDP2 DP=2, stopped at 2: the serial resume continues it
    quad = [{"name": "tp2dp2-stop", "argv": hf_args(
        data, model, root / "tp2dp2-stop", "--backend", "hf", "--tensor_model_parallel_size",
        "2", "--exit_interval", str(STOP))}]
    return root, start_runs(1, serial, root / "serial", early=True), start_runs(
        2, pair, root / "pair", early=True), start_runs(4, quad, root / "quad", early=True)


@pytest.fixture(scope="module")
def hf_runs(request) -> Path:
    root, *launches = started("hf_runs", request)
    for launch in launches:
        for name, result in launch.wait().items():
            assert result.returncode == 0, (name, result.log[-3000:])
    return root


@pytest.fixture(scope="module")
def resumed(hf_runs, imported_train_data, hf_tiny_llama) -> dict:
    """The TP=2 x DP=2 run stopped at iteration 2, relaunched with --auto_resume at TP=1,
    DP=1 and no --backend (the checkpoint says hf); the exports of the runs."""
    run = hf_runs / "resumed"
    shutil.copytree(hf_runs / "tp2dp2-stop", run)
    jobs = [{"name": "resume", "argv": hf_args(imported_train_data, hf_tiny_llama, run,
                                               "--auto_resume")}]
    # --finetune from the hf run's checkpoint: one step at the warm-up's rate 0
    jobs.append({"name": "finetune", "argv": hf_args(
        imported_train_data, hf_runs / "hf", hf_runs / "finetuned", "--finetune",
        "--train_iters", "1", "--vocab_file", imported_train_data["vocab_file"],
        *imported_train_data["tokenizer_flags"])})
    jobs += [tool_job(f"export-{name}", "megatron_to_hf.py", "--load", str(hf_runs / name),
                      "--out", str(hf_runs / f"export-{name}")) for name in ("hf", "megatron")]
    jobs.append(tool_job("export-lora", "megatron_to_hf.py", "--load", str(hf_runs / "lora"),
                         "--out", str(hf_runs / "export-lora"), "--adapter_only"))
    # generation and evaluation on both backends' checkpoints (the same training)
    records = hf_runs / "records.jsonl"
    records.write_text("\n".join((SAMPLE / "test.jsonl").read_text(
        encoding="utf-8").splitlines()[:6]) + "\n", encoding="utf-8")
    for name in ("hf", "megatron"):
        jobs.append(tool_job(f"generate-{name}", "generate.py", "--load", str(hf_runs / name),
                             "--prompt", "What is 2+2?", "--prompt", "Name a colour.",
                             "--max_new_tokens", "8"))
    jobs += [tool_job(f"evaluate-{name}", "evaluate.py", "--load", str(hf_runs / name),
                      "--input", str(records), "--max_new_tokens", "4", "--summary_json",
                      str(hf_runs / f"evaluate-{name}.json")) for name in ("hf", "megatron")]
    results = start_runs(1, jobs, hf_runs / "later").wait()
    for name, result in results.items():
        assert result.returncode == 0, (name, result.log[-3000:])
    return results


def assert_same_curve(got: list[dict], want: list[dict], rtol: float = 1e-5) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == list(
        range(1, ITERS + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=rtol), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rtol), (g, w)
        assert g["consumed_tokens"] == w["consumed_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("packed", ["", "-packed"])
def test_hf_backend_equals_megatron_on_the_same_weights(hf_runs, packed):
    """Same HF weights, data, loss, optimizer and schedule: the same losses and gradient
    norms, one process and FSDP2 over two."""
    megatron = train_metrics(hf_runs / f"megatron{packed}")
    assert_same_curve(train_metrics(hf_runs / f"hf{packed}"), megatron)
    assert_same_curve(train_metrics(hf_runs / f"dp2{packed}"), megatron)
    if not packed:  # TP=2 through the model's tp_plan
        assert_same_curve(train_metrics(hf_runs / "tp2"), megatron)
    assert train_metrics(hf_runs / f"hf{packed}", "valid")


@pytest.mark.slow
@pytest.mark.parametrize("packed", ["", "-packed"])
@pytest.mark.parametrize("family", CROSS)
def test_hf_backend_equals_megatron_on_qwen2_and_gemma3(hf_runs, family, packed):
    """The same comparison, one process and FSDP2 over two, on the families whose mapping
    has more to get wrong than Llama's (biases, tied and scaled embeddings, ``1 + w``
    norms, sliding windows): transformers' code and our megatron-core family train
    alike."""
    megatron = train_metrics(hf_runs / f"{family}-megatron{packed}")
    assert_same_curve(train_metrics(hf_runs / f"{family}-hf{packed}"), megatron)
    assert_same_curve(train_metrics(hf_runs / f"{family}-dp2{packed}"), megatron)


@pytest.mark.slow
def test_tp2_dp2_checkpoint_resumes_at_tp1_dp1_on_the_straight_curve(hf_runs, resumed):
    """TP=2 x DP=2 = the serial run (its first two steps), and its checkpoint resumes in
    one process on the straight curve (DCP reshards)."""
    stopped = hf_runs / "tp2dp2-stop"
    assert (stopped / "latest_checkpointed_iteration.txt").read_text().strip() == str(STOP)
    assert not list(stopped.glob("*.incomplete"))
    log = resumed["resume"].log
    assert "backend hf: --save" in log and "holds a checkpoint of the hf backend" in log
    assert_same_curve(train_metrics(hf_runs / "resumed"), train_metrics(hf_runs / "hf"))


@pytest.mark.slow
def test_finetune_from_an_hf_checkpoint_takes_its_weights(hf_runs, resumed):
    """``--finetune --load`` a checkpoint of the hf backend: its weights (the first step's
    rate is 0, so the validation loss is the checkpoint's own), a fresh run."""
    assert "loaded weights from" in resumed["finetune"].log
    finetuned = train_metrics(hf_runs / "finetuned", "valid")[-1]["loss"]
    assert finetuned == pytest.approx(train_metrics(hf_runs / "hf", "valid")[-1]["loss"],
                                      rel=1e-6)
    assert [r["iteration"] for r in train_metrics(hf_runs / "finetuned")] == [1]


@pytest.mark.slow
def test_hf_checkpoint_exports_a_model_transformers_loads_with_the_same_logits(
        hf_runs, resumed):
    """The hf run's export and the megatron run's (the same training, within 1e-5) give
    transformers the same logits: the export is transformers' names, config, tokenizer."""
    import transformers

    tokens = torch.randint(0, 1502, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = hf_logits(hf_runs / "export-hf", tokens)
    theirs = hf_logits(hf_runs / "export-megatron", tokens)
    assert ours.shape[-1] == 1536  # every row the model trained with
    assert (ours[..., :1502] - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert "1536 embedding rows kept" in resumed["export-hf"].stdout
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_runs / "export-hf")
    assert tokenizer.chat_template and len(tokenizer) == 1502
    config = json.loads((hf_runs / "export-hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 1536


@pytest.mark.slow
def test_recompute_and_compile_change_nothing_and_bf16_computes_in_bf16(hf_runs):
    straight = train_metrics(hf_runs / "hf")[:2]
    got = train_metrics(hf_runs / "recompute-compiled")  # both at once: one job
    assert [r[k] for r in got for k in ("loss", "grad_norm")] == pytest.approx(
        [r[k] for r in straight for k in ("loss", "grad_norm")], rel=1e-5)
    log = (hf_runs / "serial" / "recompute-compiled.log").read_text()
    assert "2 decoder layers, recomputed, compiled (aot_eager)" in log
    bf16 = train_metrics(hf_runs / "bf16")
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in straight], rel=1e-3)
    assert [r["loss"] for r in bf16] != [r["loss"] for r in straight]  # computed in bf16
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(hf_runs / "bf16" / "iter_0000002")).read_metadata()
    weight = saved.state_dict_metadata["model.model.embed_tokens.weight"]
    assert weight.properties.dtype == torch.float32  # fp32 parameters, bf16 compute


def peft_reference(model_dir: Path, data: dict, dora: bool, targets: list[str]):
    """peft's own loop on the same batches: ``get_peft_model`` drawn from the runs' seed,
    torch's AdamW at the constant rate, the global batch's weighted mean loss, the
    gradient norm clipped to 1. Returns (the losses, the trained peft model)."""
    import peft
    import transformers

    from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
    from megatron_ext.training.config import DataArgs
    from megatron_ext.training.data import BatchBuilder, build_splits

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1234)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=32.0, target_modules=targets, use_dora=dora, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": plain}] if plain
                                  else [{"params": decay}], lr=1e-3, weight_decay=0.0)
    tokenizer = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", data["vocab_file"],
                                                CHATML, megatron_llm_specials=False))
    split = build_splits(DataArgs(data_path=(data["prefix"],), split="90,10,0"), 1234)["train"]
    batches = BatchBuilder(96, tokenizer.pad_id or 0, 0.0, True, 2, 0, 1)
    losses = []
    for step in range(ITERS):
        gb = batches.global_batch(split, 8 * step, 8)
        optimizer.zero_grad()
        total = 0.0
        for mb in gb.micro_batches:
            logits = model(input_ids=mb.tokens, position_ids=mb.position_ids,
                           use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten(),
                                                   reduction="none").view_as(mb.labels)
            loss = (ce * mb.loss_weights).sum()
            (loss / gb.total_weight).backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(total / gb.total_weight)
    return losses, model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_hf_backend_adapters_equal_peft_own_loop(hf_runs, resumed, imported_train_data,
                                                 hf_tiny_llama, method):
    """LoRA (megatron-core's default target names, mapped to q/k/v/o/gate/up/down; stopped
    at step 2 and resumed) and DoRA (``*_proj``) train as peft's own loop does; the LoRA
    export is peft's layout, and peft loads it with the trained model's logits."""
    import peft
    import transformers

    targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    want, model = peft_reference(hf_tiny_llama, imported_train_data, method == "dora", targets)
    got = train_metrics(hf_runs / method)
    assert [r["iteration"] for r in got] == list(range(1, ITERS + 1))
    assert [r["loss"] for r in got] == pytest.approx(want, rel=1e-5)
    run_config = json.loads(next((hf_runs / method).glob("iter_*/run_config.json")).read_text())
    assert run_config["peft"]["targets"] == targets
    if method == "dora":
        return
    assert "holds a checkpoint of the hf backend: resuming it" in (
        hf_runs / "serial" / "lora.log").read_text()
    # the checkpoint holds the adapters only (weights and optimizer state)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = dcp.FileSystemReader(str(hf_runs / "lora" / "iter_0000004")).read_metadata()
    tensors = [key for key, meta in saved.state_dict_metadata.items()
               if isinstance(meta, TensorStorageMetadata) and not key.endswith(".step")]
    assert tensors and all(".lora_A." in key or ".lora_B." in key for key in tensors), tensors
    tokens = torch.randint(0, 1502, (2, 40), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_tiny_llama)
    exported = peft.PeftModel.from_pretrained(base, hf_runs / "export-lora")
    with torch.no_grad():
        ours, theirs = exported(tokens).logits, model(tokens).logits
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.slow
def test_generate_and_evaluate_take_hf_backend_checkpoints(hf_runs, resumed):
    """tools/generate.py and tools/evaluate.py on the hf run's checkpoint (transformers'
    model and KV cache) answer as on the megatron run's (the same training): the same
    greedy tokens, the same answer loss."""
    def generated(name: str) -> list[list[int]]:
        return [json.loads(line)["generated_ids"]
                for line in resumed[f"generate-{name}"].stdout.splitlines()]

    assert generated("hf") == generated("megatron") and len(generated("hf")[0]) == 8
    ours, theirs = (json.loads((hf_runs / f"evaluate-{name}.json").read_text())
                    for name in ("hf", "megatron"))
    assert ours["answer_loss"] == pytest.approx(theirs["answer_loss"], rel=1e-5)
    assert ours["records"] == theirs["records"] == 6


# ------------------------------------------------------------ in-process: the plan
def _config(model: Path, *flags: str):
    from megatron_ext.training.arguments import config_from_args, build_parser

    return config_from_args(build_parser().parse_args([
        "--data_path", "unused", "--train_iters", "1", "--load", str(model), *flags]))


def _model_dir(root: Path, config: dict, sp_model: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    shutil.copy(sp_model, root / "tokenizer.model")
    return root


def test_auto_backend_is_megatron_for_a_family_and_hf_for_any_other_model(tmp_path, sp_model):
    from megatron_ext.training.plan import choose_backend

    llama = _model_dir(tmp_path / "llama", {"model_type": "llama"}, sp_model)
    phi3 = _model_dir(tmp_path / "phi3", {"model_type": "phi3"}, sp_model)
    backend, why = choose_backend(_config(llama))
    assert backend == "megatron" and "claims model_type 'llama'" in why
    backend, why = choose_backend(_config(phi3))
    assert backend == "hf" and "no family in models/families claims model_type 'phi3'" in why
    assert choose_backend(_config(llama, "--backend", "hf")) == ("hf", "--backend hf")


@pytest.mark.parametrize("flags, message", [
    (("--pipeline_model_parallel_size", "2"), "the hf backend has no pipeline parallelism"),
    (("--context_parallel_size", "2"), "the hf backend has no context parallelism"),
    (("--fp16",), "use --bf16"),
])
def test_hf_backend_refuses_what_it_cannot_do_before_any_process_group(
        tmp_path, sp_model, flags, message):
    from megatron_ext.training.plan import resolve

    phi3 = _model_dir(tmp_path / "phi3", {"model_type": "phi3"}, sp_model)
    with pytest.raises(ConfigError, match=message):
        resolve(_config(phi3, "--vocab_extra_ids_list", ",".join(CHATML), *flags),
                world_size=2)


@pytest.mark.parametrize("config, flags, message", [
    ({"model_type": "my_own", "auto_map": {"AutoModelForCausalLM": "m.MyModel"}}, (),
     "ships its own model code .* pass --trust_remote_code"),
    ({"model_type": "not_a_model"}, (), "'not_a_model' is not one this transformers knows"),
    ({"model_type": "gpt2"}, ("--backend", "hf", "--tensor_model_parallel_size", "2"),
     r"\(gpt2\) has no tensor-parallel plan .*use 1"),
])
def test_hf_backend_refuses_remote_code_and_unknown_models(tmp_path, sp_model, config,
                                                           flags, message):
    from megatron_ext.training.plan import resolve

    model = _model_dir(tmp_path / "model", config, sp_model)
    with pytest.raises(ConfigError, match=message):
        resolve(_config(model, *flags), world_size=2)


def test_a_model_built_on_the_meta_device_gets_its_rope_buffers_back(hf_tiny_llama):
    """``to_empty`` leaves RoPE's inv_freq uninitialized (no checkpoint holds it): the
    step-0 loss of the materialized model with the saved weights is transformers' own."""
    import transformers

    from megatron_ext.hf_native.model import build_empty_model, materialize

    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_tiny_llama)
    model = build_empty_model(json.loads((hf_tiny_llama / "config.json").read_text()),
                              torch.float32)
    model.to_empty(device="cpu")
    torch.nn.init.constant_(model.model.rotary_emb.inv_freq, 0.0)  # as the bug leaves it
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 1500, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(tokens, labels=tokens)
        broken = model(tokens, labels=tokens)
    assert (broken.logits - want.logits).abs().max() > 1e-4  # positions lost
    materialize(model, torch.device("cpu"))
    model.load_state_dict(reference.state_dict())
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    with torch.no_grad():
        got = model(tokens, labels=tokens)
    assert got.loss.item() == want.loss.item()
    assert torch.equal(got.logits, want.logits)


def test_checkpoint_util_says_what_an_hf_backend_checkpoint_is(tmp_path):
    from megatron_ext.checkpointing.tracker import iteration_dir, write_tracker
    from megatron_ext.errors import CheckpointError
    from megatron_ext.io import write_json
    from tests.training.run_many import tool_main

    directory = Path(iteration_dir(str(tmp_path), 7))
    directory.mkdir()
    write_json(str(directory / "run_config.json"), {
        "backend": {"backend": "hf"}, "hf_model": {"path": "/m", "config": {
            "model_type": "phi3"}}})
    write_json(str(directory / "common.json"), {"iteration": 7, "layout": {"dp": 2, "tp": 1}})
    write_tracker(str(tmp_path), 7)
    with pytest.raises(CheckpointError, match=r"checkpoint of the Hugging Face backend .*phi3 "
                       r"from /m: the whole model, iteration 7, saved at DP 2 x TP 1.*"
                       r"tools/megatron_to_hf.py exports it"):
        tool_main("checkpoint_util.py")(["merge", "--load", str(tmp_path), "--out",
                                         str(tmp_path / "out")])


def test_a_gguf_file_trains_on_the_hf_backend_with_its_own_tokenizer(tmp_path,
                                                                      hf_tokenizer_dir):
    """``--backend hf --load model.gguf`` without --vocab_file: the file's own tokenizer,
    rebuilt once (transformers' conversion) into the run's import cache and reused by the
    next run (and by every rank: one lock, one published folder)."""
    import transformers

    from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once
    from megatron_ext.tokenizers import build_tokenizer
    from megatron_ext.training.plan import resolve
    from tests.checkpointing.gguf_files import write_gguf

    gguf, _ = write_gguf(tmp_path / "tiny.gguf", "llama-tied",
                         Path(hf_tokenizer_dir) / "tokenizer.json")
    flags = ("--backend", "hf", "--save", str(tmp_path / "run"))
    tokenizer = resolve(_config(gguf, *flags), world_size=1).config.tokenizer
    folder = Path(tokenizer.vocab_file)
    assert folder.parent == tmp_path / "run" / "imported_models"
    assert folder.name.startswith("tiny-") and folder.name.endswith(".tokenizer")
    with transformers_reads_gguf_once():
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "The quick brown fox: what is 2+2? Ünïcode too."
    ours = build_tokenizer(tokenizer.config())
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    written = (folder / "tokenizer.json").stat().st_mtime_ns
    again = resolve(_config(gguf, *flags), world_size=1).config.tokenizer
    assert again.vocab_file == tokenizer.vocab_file
    assert (folder / "tokenizer.json").stat().st_mtime_ns == written  # reused, not rewritten
