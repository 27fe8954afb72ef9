"""Train small tokenizers from text: for demos and tests (nothing is downloaded).

Why: the project must run end to end without any hub download, so the demo
and the tests train a tokenizer shaped like Llama's (SentencePiece BPE with
byte fallback, identity normalization, digits split) or like Llama 3's
(byte-level BPE in a ``tokenizer.json``) from the data at hand.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator


def jsonl_texts(paths: Iterable[str]) -> Iterator[str]:
    """Every string value of every record, line by line (for tokenizer training)."""
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield from _strings(json.loads(line))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 2000,
                        user_defined_symbols: tuple[str, ...] = ()) -> str:
    """Train a Llama-style SentencePiece BPE model; returns the ``.model`` path."""
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9995,
        user_defined_symbols=list(user_defined_symbols),
        hard_vocab_limit=False,
        num_threads=min(4, os.cpu_count() or 1),
        minloglevel=2,
    )
    return model_prefix + ".model"


def train_byte_level_bpe(texts: Iterable[str], path: str, vocab_size: int = 2000,
                         special_tokens: tuple[str, ...] = ("<|begin_of_text|>", "<|end_of_text|>"),
                         ) -> str:
    """Train a byte-level BPE ``tokenizer.json`` (the Llama 3 / GPT-2 kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return path
