#!/usr/bin/env python3
"""Train a small Llama-style tokenizer on JSONL records (demo and tests; no download).

examples:
  python tools/train_tokenizer.py --input data/sample/training.jsonl --out runs/tok/tokenizer
      (writes runs/tok/tokenizer.model: SentencePiece BPE with byte fallback, like Llama 2)
  python tools/train_tokenizer.py --kind hf --input data.jsonl --out runs/tok/tokenizer.json
      (writes a byte-level BPE tokenizer.json, like Llama 3)
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import FlagParser, run_cli  # noqa: E402
from megatron_ext.errors import ConfigError, DataError  # noqa: E402
from megatron_ext.tokenizers.training import (  # noqa: E402
    jsonl_texts,
    train_byte_level_bpe,
    train_sentencepiece,
)


def main(argv=None) -> int:
    parser = FlagParser(prog="train_tokenizer.py", description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files to learn from")
    parser.add_argument("--out", required=True,
                        help="SentencePiece: model prefix (writes PREFIX.model); hf: tokenizer.json path")
    parser.add_argument("--kind", choices=["sentencepiece", "hf"], default="sentencepiece")
    parser.add_argument("--vocab_size", type=int, default=4000)
    args = parser.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"directory {out_dir} does not exist: create it first")
    missing = [path for path in args.input if not os.path.isfile(path)]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    try:
        texts = list(jsonl_texts(args.input))
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
        raise DataError(f"cannot read the input as JSONL: {exc}") from None
    if not texts:
        raise DataError("the input holds no text to learn from")
    try:
        return _train(args, texts)
    except RuntimeError as exc:  # sentencepiece reports bad settings this way
        raise ConfigError(f"tokenizer training failed: {str(exc).strip()}") from None


def _train(args, texts) -> int:
    if args.kind == "sentencepiece":
        import sentencepiece

        path = train_sentencepiece(texts, args.out, args.vocab_size)
        size = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
    else:
        from tokenizers import Tokenizer

        path = train_byte_level_bpe(texts, args.out, args.vocab_size)
        size = Tokenizer.from_file(path).get_vocab_size()
    note = "" if size == args.vocab_size else f" (asked for {args.vocab_size}; the data has no more)"
    print(f"wrote {path}: {size} tokens{note}, trained on {len(texts)} texts")
    return 0


if __name__ == "__main__":
    run_cli(main)
