"""Shared fixtures: tokenizers trained on the fly and JSONL writers (no downloads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_ext.tokenizers.training import (  # noqa: E402
    jsonl_texts,
    train_byte_level_bpe,
    train_sentencepiece,
)

SAMPLE = REPO / "data" / "sample"
CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

UNICODE_TEXTS = [
    "Grüße aus Köln! Ça va? ¿Qué tal?",
    "日本語のテキストと中文文本。",
    "Emoji 🤖🚀 and math ∑ x² ≤ ∞",
    "tabs\tand  double  spaces\nand\nnew lines",
]


def _corpus() -> list[str]:
    texts = list(jsonl_texts([SAMPLE / "training.jsonl"]))
    return texts + UNICODE_TEXTS * 5


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A Llama-2-like SentencePiece BPE model (byte fallback, identity normalization)."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    return train_sentencepiece(_corpus(), str(prefix), vocab_size=1500)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A Llama-3-like byte-level BPE tokenizer.json with its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("hf")
    train_byte_level_bpe(_corpus(), str(directory / "tokenizer.json"), vocab_size=1500,
                         special_tokens=("<|begin_of_text|>", "<|end_of_text|>"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return str(directory)


def write_jsonl(path: Path, records) -> Path:
    """Write records (dicts, or raw str/bytes lines written as they are)."""
    with open(path, "wb") as handle:
        for record in records:
            if isinstance(record, bytes):
                handle.write(record + b"\n")
            elif isinstance(record, str):
                handle.write(record.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def qa_records(n: int, seed: int = 0):
    """Varied question/answer records with unicode and some system prompts."""
    import random

    rng = random.Random(seed)
    words = ("alpha beta gamma delta epsilon the of model train answer question data "
             "Köln 日本 🤖 42 3.14 x²").split()
    out = []
    for i in range(n):
        record = {
            "question": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "?",
            "answer": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) + ".",
        }
        if i % 3 == 0:
            record["system"] = "You are a helpful assistant."
        out.append(record)
    return out


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env
