"""End to end: a tiny model memorises a few answers (proves learning, masking, epochs)."""

from __future__ import annotations

import json

import pytest

from instruct.preprocess_instruct_data import build_parser, config_from_args
from megatron_ext.data.preprocess import run_preprocess
from tests.conftest import CHATML, SAMPLE
from tests.runs import start_runs, started, starts_early, train_metrics


@starts_early("overfit_run")
def start_overfit_run(request):
    """Its small dataset, prepared here, and its run."""
    tmp_path = request.getfixturevalue("tmp_path_factory").mktemp("overfit")
    sp_model = request.getfixturevalue("sp_model")
    records = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text().splitlines()]
    short = [r for r in records if len(r["answer"]) < 40][:16]
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in short))
    run_preprocess(config_from_args(build_parser().parse_args([
        "--input", str(source), "--output_prefix", str(tmp_path / "small"),
        "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
        "--vocab_extra_ids_list", ",".join(CHATML), "--question_key", "question",
        "--answer_key", "answer", "--workers", "1", "--no_progress"])))
    return tmp_path, start_runs(1, [{"name": "overfit", "argv": [
        "--train_data_path", str(tmp_path / "small"), "--valid_data_path", str(tmp_path / "small"),
        "--test_data_path", str(tmp_path / "small"),
        "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
        "--vocab_extra_ids_list", ",".join(CHATML), "--num_layers", "2", "--hidden_size", "96",
        "--num_attention_heads", "4", "--seq_length", "64", "--variable_seq_lengths",
        "--micro_batch_size", "8", "--global_batch_size", "8", "--epochs", "60",
        "--lr", "3e-3", "--lr_decay_style", "constant", "--eval_iters", "2",
        "--log_interval", "5", "--save", str(tmp_path / "run")]}], tmp_path / "launch",
        early=True)


@pytest.fixture(scope="module")
def overfit_run(request):
    tmp_path, launch = started("overfit_run", request)
    return tmp_path, launch.wait()["overfit"]


@pytest.mark.slow
def test_tiny_model_overfits_a_small_dataset(overfit_run):
    tmp_path, result = overfit_run
    assert result.returncode == 0, result.log[-3000:]
    train = train_metrics(tmp_path / "run")
    valid = train_metrics(tmp_path / "run", "valid")
    assert train[-1]["iteration"] == 120  # 60 epochs of 16 records in batches of 8
    assert train[0]["loss"] > 4.0
    assert valid[-1]["loss"] < 0.2, (train[-1], valid[-1])  # answer-token loss on the same data
    test = train_metrics(tmp_path / "run", "test")  # the test split is evaluated at the end
    assert len(test) == 1 and test[0]["loss"] == pytest.approx(valid[-1]["loss"], rel=1e-6)
    assert train[-1]["padding_fraction"] < 0.6
