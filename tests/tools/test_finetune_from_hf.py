"""``finetune.py --load HF_DIR``: imported once into the cache, reused, the same training as
from an explicit ``tools/hf_to_megatron.py`` conversion, the model's tokenizer checked against
the data, and two processes that find an empty cache import once.

Two launches side by side: one process (the conversion, five runs and one refused run, in
order) and two processes (DP=2, both ranks asking for the same import at once)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from instruct.preprocess_instruct_data import build_parser, config_from_args
from megatron_ext.checkpointing.import_cache import (
    ImportOptions,
    cache_key,
    describe_source,
    entry_name,
)
from megatron_ext.checkpointing.unsharded import MARKER
from megatron_ext.data.preprocess import run_preprocess
from tests.conftest import CHATML
from tests.runs import start_runs, tool_job, train_metrics

EXTRA = ",".join(CHATML)
ITERS = 2
IMPORTING = re.compile(r"importing \S+ into the cache ")


def run_args(prefix: str, save: Path) -> list[str]:
    """Data, batches and schedule; no model shape and no tokenizer: both come from --load."""
    return ["--data_path", prefix, "--split", "90,10,0", "--vocab_extra_ids_list", EXTRA,
            "--seq_length", "96", "--variable_seq_lengths", "--micro_batch_size", "2",
            "--global_batch_size", "8", "--train_iters", str(ITERS), "--lr", "1e-3",
            "--lr_warmup_iters", "1", "--eval_iters", "1", "--seed", "1234",
            "--save", str(save)]


def bpe_data(train_data: dict, model: Path, out: Path) -> str:
    """The training records tokenized with the model directory's tokenizer.json, as a user
    would have made them before: --tokenizer_type HFTokenizer --vocab_file HF_DIR."""
    source = Path(train_data["prefix"]).parent / "train.jsonl"
    out.mkdir()
    argv = ["--input", str(source), "--output_prefix", str(out / "train"),
            "--tokenizer_type", "HFTokenizer", "--vocab_file", str(model),
            "--vocab_extra_ids_list", EXTRA, "--question_key", "question",
            "--answer_key", "answer", "--system_key", "system", "--max_seq_length", "96",
            "--overlong", "truncate", "--workers", "1", "--no_progress"]
    run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return str(out / "train")


def gguf_data(train_data: dict, gguf: Path, out: Path) -> str:
    """The training records tokenized with the tokenizer rebuilt from the GGUF's metadata (the
    same conversion the import makes, so the same tokenizer identity)."""
    from megatron_ext.models.gguf_checkpoint import GGUFModel

    GGUFModel(str(gguf)).write_tokenizer(str(out / "tokenizer"))
    source = Path(train_data["prefix"]).parent / "train.jsonl"
    argv = ["--input", str(source), "--output_prefix", str(out / "train"),
            "--tokenizer_type", "HFTokenizer", "--vocab_file", str(out / "tokenizer"),
            "--vocab_extra_ids_list", EXTRA, "--question_key", "question",
            "--answer_key", "answer", "--system_key", "system", "--max_seq_length", "96",
            "--overlong", "truncate", "--workers", "1", "--no_progress"]
    run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return str(out / "train")


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory, hf_llama, hf_llama_bpe, imported_train_data,
            hf_tokenizer_dir) -> dict:
    root = tmp_path_factory.mktemp("finetune_from_hf")
    # data tokenized with the model's own tokenizer.model ids (no Megatron-LLM additions)
    cache, prefix = root / "cache", imported_train_data["prefix"]
    entry = cache / entry_name(str(hf_llama), cache_key(describe_source(str(hf_llama),
                                                                        ImportOptions(EXTRA))))
    converted = root / "converted"
    bpe_prefix = bpe_data(imported_train_data, hf_llama_bpe, root / "bpe_data")
    from_hf = ["--load", str(hf_llama), "--import_cache_dir", str(cache)]
    from tests.checkpointing.gguf_files import write_gguf

    gguf, _ = write_gguf(root / "tiny.gguf", "llama-tied", Path(hf_tokenizer_dir) / "tokenizer.json")
    gguf_prefix = gguf_data(imported_train_data, gguf, root / "gguf_data")
    serial = start_runs(1, [
        tool_job("convert", "hf_to_megatron.py", "--model_path", str(hf_llama), "--out",
                 str(converted), "--vocab_extra_ids_list", EXTRA),
        {"name": "first", "argv": run_args(prefix, root / "first") + from_hf,
         "stat": [str(entry / MARKER)]},
        {"name": "again", "argv": run_args(prefix, root / "again") + from_hf,
         "stat": [str(entry / MARKER)]},
        {"name": "explicit", "argv": run_args(prefix, root / "explicit") + [
            "--load", str(converted), "--finetune", "--use_checkpoint_args",
            "--tokenizer_type", "SentencePieceTokenizer",
            "--vocab_file", str(converted / "tokenizer" / "tokenizer.model"),
            "--no_megatron_llm_specials"]},
        # the default cache (under --save); the data was made from the model directory
        {"name": "bpe", "argv": run_args(bpe_prefix, root / "bpe") + [
            "--load", str(hf_llama_bpe)]},
        # a GGUF file: imported on the fly (dequantized), its rebuilt tokenizer used
        {"name": "gguf", "argv": run_args(gguf_prefix, root / "gguf") + [
            "--load", str(gguf), "--import_cache_dir", str(root / "cache_gguf")]},
        # the check is not switched off: data of another tokenizer is still refused
        {"name": "bpe_wrong_data", "argv": run_args(prefix, root / "wrong") + [
            "--load", str(hf_llama_bpe), "--import_cache_dir", str(cache)]},
    ], root / "serial")
    parallel = start_runs(2, [
        {"name": "dp2", "argv": run_args(prefix, root / "dp2") + [
            "--load", str(hf_llama), "--import_cache_dir", str(root / "cache_dp2")]},
    ], root / "parallel")
    results = {**parallel.wait(), **serial.wait()}
    return {"root": root, "entry": entry, "results": results,
            # rank 0's log (the workers keep the other ranks' output to themselves)
            "parallel_log": results["dp2"].log}


def ok(hf_runs, name: str):
    result = hf_runs["results"][name]
    assert result.returncode == 0, result.log[-3000:]
    return result


def test_first_run_imports_and_the_second_reuses(hf_runs):
    first, again = ok(hf_runs, "first"), ok(hf_runs, "again")
    entry = str(hf_runs["entry"])
    assert len(IMPORTING.findall(first.log)) == 1 and f"into the cache {entry}" in first.log
    assert f"loaded weights from {entry} (iteration 0)" in first.log
    assert not IMPORTING.search(again.log) and f"using its import cached in {entry}" in again.log
    marker = str(hf_runs["entry"] / MARKER)
    assert first.mtimes[marker] == again.mtimes[marker]  # not rewritten
    assert [r["loss"] for r in train_metrics(hf_runs["root"] / "first")] == [
        r["loss"] for r in train_metrics(hf_runs["root"] / "again")]


def test_training_equals_training_from_an_explicit_conversion(hf_runs):
    ok(hf_runs, "first"), ok(hf_runs, "explicit")
    assert "converted" in hf_runs["results"]["convert"].stdout
    ours = train_metrics(hf_runs["root"] / "first")
    explicit = train_metrics(hf_runs["root"] / "explicit")
    assert len(ours) == ITERS
    assert [r["loss"] for r in ours] == [r["loss"] for r in explicit]  # bit-exact
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in explicit]


def test_the_models_tokenizer_passes_the_check_of_data_made_from_the_model(hf_runs):
    bpe = ok(hf_runs, "bpe")
    default_cache = hf_runs["root"] / "bpe" / "imported_models"
    assert IMPORTING.search(bpe.log) and f"into the cache {default_cache}/" in bpe.log
    assert len(train_metrics(hf_runs["root"] / "bpe")) == ITERS
    wrong = hf_runs["results"]["bpe_wrong_data"]
    assert wrong.returncode == 1
    assert "was tokenized with a different tokenizer" in wrong.log


def test_two_processes_on_an_empty_cache_import_once(hf_runs):
    ok(hf_runs, "dp2")
    log = hf_runs["parallel_log"]
    # rank 0 imported, or found the other rank's import (waiting for it or reusing it); it
    # never imported a second copy beside the other's
    assert len(IMPORTING.findall(log)) + ("using its import cached" in log) == 1, log[-3000:]
    assert "imported by another process meanwhile" not in log
    cache = hf_runs["root"] / "cache_dp2"
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and names[1] == names[0] + ".lock"  # one entry, no debris
    serial = train_metrics(hf_runs["root"] / "first")[0]["loss"]
    parallel = train_metrics(hf_runs["root"] / "dp2")[0]["loss"]
    assert abs(parallel - serial) <= 1e-5 * abs(serial)


def test_a_gguf_file_is_imported_on_the_fly_with_its_own_tokenizer(hf_runs):
    result = ok(hf_runs, "gguf")
    cache = hf_runs["root"] / "cache_gguf"
    assert len(IMPORTING.findall(result.log)) == 1 and f"into the cache {cache}/" in result.log
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1
    run_config = json.loads((entries[0] / "run_config.json").read_text())
    assert run_config["source"]["gguf_path"].endswith("tiny.gguf")
    assert run_config["model"]["tie_embeddings"] is True
    train = train_metrics(hf_runs["root"] / "gguf")
    assert len(train) == ITERS and all(math.isfinite(r["loss"]) for r in train)
