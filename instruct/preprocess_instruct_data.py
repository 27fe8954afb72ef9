#!/usr/bin/env python3
"""Turn JSONL instruction records into megatron indexed token and role streams.

Each input line is one record: a question/answer pair (with an optional
system prompt) or a multi-turn conversation. Records are rendered with a chat
format, tokenized by N worker processes and written, in input order, as

  {prefix}-text.bin/.idx   token ids, one sequence (and document) per record
  {prefix}-role.bin/.idx   one role id per token: system 0, user 1, assistant 2
  {prefix}-meta.json       tokenizer identity, chat format, counts, lengths

Files appear only when complete. Bad lines are skipped, counted and reported
(or stop the run with --strict).

examples:
  # question/answer records, ChatML, SentencePiece (Llama 2) tokenizer
  python instruct/preprocess_instruct_data.py --input data/train.jsonl \\
      --output_prefix out/train --tokenizer_type SentencePieceTokenizer \\
      --vocab_file tokenizer.model --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \\
      --question_key question --answer_key answer --system_key system --workers 8

  # multi-turn conversations, Llama 3 format, Hugging Face tokenizer
  python instruct/preprocess_instruct_data.py --input 'chats/*.jsonl.gz' \\
      --output_prefix out/chats --tokenizer_type HFTokenizer --vocab_file llama3/ \\
      --messages_key messages --chat_format llama3 --max_seq_length 8192 --overlong truncate
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import FlagParser, run_cli, setup_logging  # noqa: E402
from megatron_ext.data.chat_formats import CHAT_FORMAT_NAMES, FORMATS, unescape_template  # noqa: E402
from megatron_ext.tokenizers import TOKENIZER_TYPES  # noqa: E402


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> FlagParser:
    parser = FlagParser(
        prog="preprocess_instruct_data.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nEvery flag may also be spelled with - for _.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="JSONL files or globs (.jsonl or .jsonl.gz), read in the order given")
    group.add_argument("--question_key", default="input",
                       help="key of the user question (default: %(default)s)")
    group.add_argument("--answer_key", default="output",
                       help="key of the answer, the training target (default: %(default)s)")
    group.add_argument("--system_key", default=None,
                       help="key of an optional system prompt; absent or empty means none "
                            "(megatron-llm format renders an empty one, as Megatron-LLM does)")
    group.add_argument("--messages_key", default=None,
                       help="key of a multi-turn list of {role, content} (OpenAI) or "
                            "{from, value} (ShareGPT) messages; replaces question/answer keys. "
                            "Every assistant turn is a target")

    group = parser.add_argument_group("chat format")
    formats = "; ".join(f"{name}: {cls.description}" for name, cls in FORMATS.items())
    group.add_argument("--chat_format", default="chatml", choices=CHAT_FORMAT_NAMES,
                       help=f"how a conversation becomes text (default: %(default)s). {formats}")
    group.add_argument("--prompt_template", default=None,
                       help="single-turn template with {system}, {input} and {output} "
                            "placeholders, e.g. 'User: {input}\\nAssistant: {output}</s>'; "
                            "\\n and \\t are unescaped; implies --chat_format template")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer_type", required=True,
                       help=f"one of {', '.join(TOKENIZER_TYPES)} (SentencePiece .model file, or "
                            "a Hugging Face tokenizer.json / model directory)")
    group.add_argument("--vocab_file", required=True,
                       help="tokenizer.model, tokenizer.json, or a directory holding one")
    group.add_argument("--vocab_extra_ids_list", default=None,
                       help="comma-separated special tokens, e.g. \"<|im_start|>,<|im_end|>\": "
                            "ids after the base vocabulary, never split")
    group.add_argument("--no_new_tokens", action="store_false", dest="new_tokens",
                       help="add no token to the vocabulary: extra ids must already exist "
                            "(and SentencePiece gets no <CLS>/<SEP>/<EOD>/<MASK>/<PAD>)")

    group = parser.add_argument_group("output data")
    group.add_argument("--output_prefix", required=True,
                       help="output path prefix; writes PREFIX-text.bin/.idx, "
                            "PREFIX-role.bin/.idx and PREFIX-meta.json")
    group.add_argument("--dataset_impl", default="mmap", choices=["mmap"],
                       help="accepted for Megatron-LLM compatibility; always mmap")
    group.add_argument("--max_seq_length", type=int, default=None,
                       help="longest record in tokens; longer ones follow --overlong")
    group.add_argument("--overlong", default="drop", choices=["drop", "truncate"],
                       help="drop over-long records (counted as rejects), or truncate their end; "
                            "a record whose prompt alone fills --max_seq_length is always "
                            "rejected, never kept without its answer (default: %(default)s)")
    group.add_argument("--rejects_file", default=None,
                       help="write every rejected line as JSONL {file, line, code, reason, text}")
    group.add_argument("--strict", action="store_true",
                       help="stop with an error at the first bad record instead of skipping it")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=_available_cpus(),
                       help="tokenizer processes; output is identical for any number "
                            "(default: the CPUs available, %(default)s)")
    group.add_argument("--chunk_size", type=int, default=256,
                       help="records per task sent to a worker (default: %(default)s)")
    group.add_argument("--log_interval", type=int, default=10000,
                       help="records between progress lines when not on a terminal "
                            "(default: %(default)s)")
    group.add_argument("--no_progress", action="store_false", dest="progress",
                       help="no progress bar")
    return parser


def config_from_args(args):
    from megatron_ext.data.encode import EncodeConfig
    from megatron_ext.data.preprocess import PreprocessConfig
    from megatron_ext.data.records import RecordKeys
    from megatron_ext.tokenizers import TokenizerConfig, parse_extra_ids

    template = unescape_template(args.prompt_template) if args.prompt_template else None
    encode = EncodeConfig(
        tokenizer=TokenizerConfig(args.tokenizer_type, args.vocab_file,
                                  parse_extra_ids(args.vocab_extra_ids_list), args.new_tokens),
        keys=RecordKeys(args.question_key, args.answer_key, args.system_key, args.messages_key),
        chat_format="template" if template is not None else args.chat_format,
        prompt_template=template,
        max_seq_length=args.max_seq_length,
        overlong=args.overlong,
    )
    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        encode=encode,
        workers=args.workers,
        chunk_size=args.chunk_size,
        log_interval=args.log_interval,
        rejects_file=args.rejects_file,
        strict=args.strict,
        progress=args.progress,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from megatron_ext.data.preprocess import run_preprocess

    summary = run_preprocess(config_from_args(args))
    print(summary.table())
    return 0


def console_main() -> None:
    run_cli(main)


if __name__ == "__main__":
    console_main()
