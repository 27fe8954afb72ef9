"""Fixtures for trainer tests: a small preprocessed dataset and a torchrun launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instruct.preprocess_instruct_data import build_parser, config_from_args
from megatron_ext.data.preprocess import run_preprocess
from megatron_ext.parallel import free_port
from tests.conftest import CHATML, REPO, SAMPLE


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, sp_model):
    """The first 200 sample records as ChatML, truncated to 96 tokens."""
    directory = tmp_path_factory.mktemp("train_data")
    lines = (SAMPLE / "training.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    source = directory / "train.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["--input", str(source), "--output_prefix", str(directory / "train"),
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
            "--vocab_extra_ids_list", ",".join(CHATML), "--question_key", "question",
            "--answer_key", "answer", "--system_key", "system", "--max_seq_length", "96",
            "--overlong", "truncate", "--workers", "1", "--no_progress"]
    run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return {"prefix": str(directory / "train"), "vocab_file": sp_model}


def model_args(data: dict, iters: int = 6) -> list[str]:
    return ["--data_path", data["prefix"], "--split", "90,10,0",
            "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", data["vocab_file"],
            "--vocab_extra_ids_list", ",".join(CHATML), "--model_name", "llama2",
            "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4",
            "--num_attention_heads_kv", "2", "--seq_length", "96", "--variable_seq_lengths",
            "--micro_batch_size", "2", "--global_batch_size", "8", "--train_iters", str(iters),
            "--lr", "1e-3", "--lr_warmup_iters", "1", "--eval_iters", "1", "--seed", "1234"]


def torchrun(nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(REPO / "finetune.py"), *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_metrics(directory: Path, split: str = "train") -> list[dict]:
    with open(directory / "metrics.jsonl", encoding="utf-8") as handle:
        return [r for r in map(json.loads, handle) if r["split"] == split]
