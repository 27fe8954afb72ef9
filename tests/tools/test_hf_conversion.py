"""tools/hf_to_megatron.py: exact weights, logits at TP/PP, streaming, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.unsharded import UnshardedReader
from megatron_ext.models.hf_llama import llama_to_megatron
from megatron_ext.errors import UserError
from megatron_ext.tokenizers import build_tokenizer
from tests.conftest import CHATML, REPO
from tests.runs import (
    child_env,
    import_memory_growth,
    job_logits,
    logits_job,
    model_args,
    run_many,
    start_runs,
)
from tests.tools.conftest import hf_logits, make_hf_model

EXTRA = ",".join(CHATML)


def tool_main(tool: str):
    """A tool's ``main(argv)``, for its error paths in-process (each one subprocess smoke
    test stays): tools/ is a directory of scripts, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{tool[:-3]}", REPO / "tools" / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tool_error(tool: str, *args: str) -> str:
    """Run a tool's main in-process, expect a UserError and return what the CLI prints."""
    with pytest.raises(UserError) as raised:
        tool_main(tool)([*args, "--no_progress"])
    return f"error: {raised.value}"


def start_tool(tool: str, *args: str) -> subprocess.Popen:
    """Start a tool's command line (a subprocess smoke test), output in pipes."""
    extra = [] if tool == "checkpoint_util.py" else ["--no_progress"]
    return subprocess.Popen([sys.executable, str(REPO / "tools" / tool), *args, *extra],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_tool(process: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{process.args[1]} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return result


def run_tool(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return finish_tool(start_tool(tool, *args), check)


def test_import_writes_exactly_the_converted_weights(tmp_path, hf_llama, sp_model):
    out = tmp_path / "ckpt"
    summary = import_hf(ImportConfig(str(hf_llama), str(out), vocab_extra_ids_list=EXTRA,
                                     max_shard_bytes=300_000, progress=False))
    reader = UnshardedReader(str(out))
    from safetensors.torch import load_file

    hf = load_file(str(hf_llama / "model.safetensors"))
    rows = hf["model.embed_tokens.weight"].shape[0]
    want = llama_to_megatron(hf, 4, 4, 2, summary.vocab_size, summary.vocab_size)
    assert sorted(reader.names()) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(reader.view(name), tensor), name
    embedding = reader.view("embedding.word_embeddings.weight")
    # the model's own ids plus the chat tokens only: none of Megatron-LLM's <CLS> <SEP> ...
    assert summary.new_token_rows == summary.vocab_size - rows == len(CHATML)
    tokenizer = build_tokenizer(tokenizer_config_from_run(str(out), reader.run_config()))
    assert "<CLS>" not in tokenizer.special_tokens and tokenizer.vocab_size == rows + len(CHATML)
    assert [tokenizer.special_tokens[t] for t in CHATML] == [rows, rows + 1]
    assert torch.allclose(embedding[rows:], hf["model.embed_tokens.weight"].mean(0).expand(
        summary.vocab_size - rows, -1))
    assert len(reader.index.headers) > 1  # sharded by --max_shard_size
    config = reader.run_config()
    assert config["model"]["num_attention_heads_kv"] == 2
    assert config["model"]["model_name"] == "llama2"
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == Path(sp_model).read_bytes()
    assert not (tmp_path / "ckpt.incomplete").exists()


def test_bin_shards_give_the_same_checkpoint(tmp_path, sp_model, hf_llama):
    bin_dir = make_hf_model(tmp_path / "bin", sp_model, safetensors=False)
    assert (bin_dir / "pytorch_model.bin").exists() or (
        bin_dir / "pytorch_model.bin.index.json").exists()
    a = import_hf(ImportConfig(str(hf_llama), str(tmp_path / "a"), progress=False))
    b = import_hf(ImportConfig(str(bin_dir), str(tmp_path / "b"), progress=False))
    assert (a.weights_format, b.weights_format) == ("safetensors", "bin")
    ra, rb = UnshardedReader(a.out), UnshardedReader(b.out)
    assert sorted(ra.names()) == sorted(rb.names())
    assert all(torch.equal(ra.view(n), rb.view(n)) for n in ra.names())


LOGITS_CASES = {"llama": [(2, 1), (1, 2)], "mistral": [(2, 1)]}
"""Per family, the TP/PP layouts its converted checkpoint's logits are checked at."""
VARIANT_LAYOUTS = ((1, 1), (2, 1), (1, 2))
"""The layouts of the tied Llama / Qwen2 / Qwen3 imports (``hf_variants``)."""


@pytest.fixture(scope="module")
def converted_logits(tmp_path_factory, sp_model, hf_llama, hf_mistral, hf_variants,
                     converted_llama) -> dict:
    """Every logits check of this module in two batches side by side: each family's
    conversion at its layouts (two processes), the Llama 3.1 rope-scaled model at TP=1
    (one). The converter's command line runs once (for the rope-scaled model), beside the
    in-process conversions. {(case, tp, pp): logits} plus the tokens and models."""
    root = tmp_path_factory.mktemp("converted")
    sources = {"llama": hf_llama, "mistral": hf_mistral}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    plain = make_hf_model(root / "plain", sp_model, initializer_range=0.2,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    scaled = make_hf_model(root / "scaled", sp_model, initializer_range=0.2,
                           rope_parameters=scaling)
    cli = start_tool("hf_to_megatron.py", "--model_path", str(scaled), "--out",
                     str(root / "scaled_ckpt"))
    ckpts = {"llama": converted_llama, "mistral": root / "mistral"}
    tool_main("hf_to_megatron.py")(["--model_path", str(hf_mistral), "--out",
                                    str(root / "mistral"), "--vocab_extra_ids_list", EXTRA,
                                    "--no_progress"])
    torch.manual_seed(1)
    tokens = torch.randint(0, 1500, (2, 40))  # 40 > the Mistral window of 8
    torch.manual_seed(1)
    long_tokens = torch.randint(0, 1500, (2, 200))
    jobs = {(family, tp, pp): logits_job(f"{family}_{tp}_{pp}", ckpts[family], tokens,
                                         root / "logits", tp, pp)
            for family, layouts in LOGITS_CASES.items() for tp, pp in layouts}
    # tied Llama, Qwen2 and Qwen3 (imported in-process) at TP=1, TP=2 and PP=2
    for name, source in hf_variants.items():
        import_hf(ImportConfig(str(source), str(root / name), progress=False))
        for tp, pp in VARIANT_LAYOUTS:
            jobs[(name, tp, pp)] = logits_job(f"{name}_{tp}_{pp}", root / name, tokens,
                                              root / "logits", tp, pp)
    parallel = start_runs(2, [job for key, job in jobs.items() if key[1:] != (1, 1)],
                          root / "parallel")
    finish_tool(cli)
    scaled_job = logits_job("scaled", root / "scaled_ckpt", long_tokens, root / "logits")
    serial = start_runs(1, [scaled_job] + [job for key, job in jobs.items() if key[1:] == (1, 1)],
                        root / "serial")
    results = {**parallel.wait(), **serial.wait()}
    return {"tokens": tokens, "long_tokens": long_tokens, "sources": sources,
            "plain": plain, "scaled": scaled, "scaled_ckpt": root / "scaled_ckpt",
            "variants": {name: root / name for name in hf_variants},
            "scaled_logits": job_logits(results, scaled_job),
            **{key: job_logits(results, job) for key, job in jobs.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("family,layouts", list(LOGITS_CASES.items()))
def test_converted_checkpoint_reproduces_transformers_logits(converted_logits, family, layouts):
    source = converted_logits["sources"][family]
    tokens = converted_logits["tokens"]
    want = hf_logits(source, tokens)
    for tp, pp in layouts:
        got = converted_logits[(family, tp, pp)][..., :want.shape[-1]]
        assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item()), (tp, pp)


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory, hf_llama, converted_llama, imported_train_data) -> dict:
    """Finetuning runs on converted checkpoints that must be refused, in one batch."""
    root = tmp_path_factory.mktemp("refused")
    tool_main("hf_to_megatron.py")([
        "--model_path", str(hf_llama), "--out", str(root / "other"),
        "--vocab_extra_ids_list", ",".join(reversed(CHATML)), "--no_progress"])
    return run_many(1, [
        {"name": "shape", "argv": model_args(imported_train_data, 1) + [
            "--load", str(converted_llama), "--finetune", "--rope_theta", "500000"]},
        {"name": "tokenizer", "argv": model_args(imported_train_data, 1) + [
            "--load", str(root / "other"), "--finetune", "--use_checkpoint_args"]},
    ], root / "launch")


@pytest.mark.slow
def test_tied_and_qwen_imports_reproduce_transformers_logits_at_tp1_tp2_pp2(converted_logits,
                                                                          hf_variants):
    """Tied Llama (no lm_head stored), Qwen2 (tied, QKV biases) and Qwen3 (q/k norms, head
    size 32): the imported checkpoints at TP=1, TP=2 and PP=2, in the module's launches."""
    from safetensors.torch import load_file

    tokens = converted_logits["tokens"]
    for name, source in hf_variants.items():
        reader = UnshardedReader(str(converted_logits["variants"][name]))
        tied = name != "qwen3"
        assert ("output_layer.weight" in reader.names()) is not tied  # one tensor when tied
        assert "lm_head.weight" not in load_file(str(source / "model.safetensors")) or not tied
        assert reader.run_config()["model"]["tie_embeddings"] is tied
        expected = hf_logits(source, tokens)
        for tp, pp in VARIANT_LAYOUTS:
            logits = converted_logits[(name, tp, pp)]
            diff = (logits[..., :expected.shape[-1]] - expected).abs().max()
            assert diff < 1e-5 * max(1.0, expected.abs().max().item()), (name, tp, pp, diff)


def test_finetuning_with_other_shape_flags_is_refused(refused_runs):
    """Without --use_checkpoint_args, flags that differ from the checkpoint are an error
    (not a silently truncated model or another RoPE base)."""
    result = refused_runs["shape"]
    assert result.returncode == 1
    assert "--num_layers: checkpoint 4, this run 2" in result.log
    assert "--rope_theta: checkpoint 10000, this run 500000" in result.log
    assert "--use_checkpoint_args" in result.log


@pytest.mark.slow
def test_finetuning_with_another_tokenizer_is_refused(refused_runs):
    """Same vocabulary size, other ids for the chat tokens: refused, not trained on."""
    result = refused_runs["tokenizer"]
    assert result.returncode == 1
    assert "was made with another tokenizer (special_tokens" in result.log


def _no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.incomplete").exists()


def test_unsupported_architecture_is_refused(tmp_path, hf_llama):
    model = tmp_path / "model"
    shutil.copytree(hf_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(model), "--out",
                        str(tmp_path / "out"))
    assert "model_type 'gpt2'" in stderr
    assert "llama, mistral, mixtral, olmoe, qwen2, qwen3" in stderr
    _no_output(tmp_path)


def test_rope_scaling_is_refused_not_silently_dropped(tmp_path, hf_llama):
    model = tmp_path / "model"
    shutil.copytree(hf_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (model / "config.json").write_text(json.dumps(config))
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(model), "--out",
                        str(tmp_path / "out"))
    assert "rope_scaling" in stderr
    _no_output(tmp_path)


def test_missing_files_are_named(tmp_path, hf_llama):
    model = tmp_path / "model"
    shutil.copytree(hf_llama, model)
    (model / "config.json").unlink()
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(model), "--out",
                        str(tmp_path / "out"))
    assert "config.json is missing" in stderr
    # a shard named by the index but absent
    shutil.copy(hf_llama / "config.json", model / "config.json")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(model), "--out",
                        str(tmp_path / "out"))
    assert "model-00002-of-00002.safetensors is missing" in stderr
    _no_output(tmp_path)


def test_truncated_shard_is_a_clear_error(tmp_path, hf_llama):
    model = tmp_path / "model"
    shutil.copytree(hf_llama, model)
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(model), "--out",
                        str(tmp_path / "out"))
    assert "model.safetensors: truncated" in stderr
    _no_output(tmp_path)


def test_mismatched_tokenizer_is_refused(tmp_path, hf_llama, hf_tokenizer_dir):
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(hf_llama), "--out",
                        str(tmp_path / "out"), "--tokenizer_type", "HFTokenizer",
                        "--vocab_file", str(Path(hf_tokenizer_dir) / "tokenizer.json"))
    assert "does not match the model" in stderr, stderr[-2000:]
    _no_output(tmp_path)


def test_existing_output_is_not_overwritten(tmp_path, hf_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    stderr = tool_error("hf_to_megatron.py", "--model_path", str(hf_llama), "--out",
                        str(tmp_path / "out"))
    assert "--overwrite" in stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_conversion_streams_instead_of_loading_the_model(tmp_path, sp_model):
    """Peak memory grows by a few layers, not by the model (here 16 layers, ~200 MB)."""
    model = make_hf_model(tmp_path / "big", sp_model, hidden_size=512, intermediate_size=1408,
                          num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8)
    size = (model / "model.safetensors").stat().st_size
    assert size > 150 * 2**20
    growth = import_memory_growth(model, tmp_path / "o")
    assert growth < 0.4 * size, (growth, size)


@pytest.mark.slow
def test_llama31_rope_scaling_reproduces_transformers_logits(converted_logits):
    scaled, plain = converted_logits["scaled"], converted_logits["plain"]
    out = converted_logits["scaled_ckpt"]
    assert UnshardedReader(str(out)).run_config()["model"]["rope_scaling_factor"] == 8.0
    tokens = converted_logits["long_tokens"]
    want = hf_logits(scaled, tokens)
    got = converted_logits["scaled_logits"][..., :want.shape[-1]]
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max() < 1e-5 * scale
    assert (hf_logits(plain, tokens) - want).abs().max() > 1e-3 * scale  # scaling matters here
