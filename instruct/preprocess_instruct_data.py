#!/usr/bin/env python3
"""Turn JSONL instruction records into megatron indexed token and role streams.

Each input line is one record: a question/answer pair (with an optional
system prompt) or a multi-turn conversation. Records are rendered with a chat
format, tokenized by N worker processes and written, in input order, as

  {prefix}-text.bin/.idx   token ids, one sequence (and document) per record
  {prefix}-role.bin/.idx   one role id per token: system 0, user 1, assistant 2
  {prefix}-meta.json       tokenizer identity, chat format, counts, lengths

Files appear only when complete. Bad lines are skipped, counted and reported
(or stop the run with --strict, or past --max_rejected_fraction).

record formats (detected from each file's first records when no key is given;
give --question_key/--answer_key or --messages_key to read other keys):
  {"question": ..., "answer": ..., "system": ...}     question/answer (system optional)
  {"input": ..., "output": ...}                        NeMo's input/output
  {"instruction": ..., "input": ..., "output": ...}    Alpaca: the user turn is the
      instruction, then the input after a blank line when it is not empty
  {"messages": [{"role": ..., "content": ...}, ...]}   OpenAI messages
  {"conversations": [{"from": ..., "value": ...}]}     ShareGPT (human/gpt/system
      are the user/assistant/system roles)
  Every assistant turn is a training target. One file holds one format.

tokenizer: --tokenizer_from MODEL takes the tokenizer the trainer uses with that
model (a Hugging Face model directory, a .gguf file, or a checkpoint of this
project), so the ids match without --tokenizer_type/--vocab_file.

examples:
  # question/answer records, ChatML, SentencePiece (Llama 2) tokenizer
  python instruct/preprocess_instruct_data.py --input data/train.jsonl \\
      --output_prefix out/train --tokenizer_type SentencePieceTokenizer \\
      --vocab_file tokenizer.model --vocab_extra_ids_list "<|im_start|>,<|im_end|>" \\
      --workers 8

  # the tokenizer of the model to finetune, with the ChatML tokens added
  python instruct/preprocess_instruct_data.py --input data/train.jsonl \\
      --output_prefix out/train --tokenizer_from models/SmolLM2-135M/ \\
      --vocab_extra_ids_list "<|im_start|>,<|im_end|>"

  # multi-turn conversations, Llama 3 format, Hugging Face tokenizer
  python instruct/preprocess_instruct_data.py --input 'chats/*.jsonl.gz' \\
      --output_prefix out/chats --tokenizer_type HFTokenizer --vocab_file llama3/ \\
      --messages_key messages --chat_format llama3 --max_seq_length 8192 --overlong truncate
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.data.chat_formats import unescape_template  # noqa: E402
from megatron_ext.data.encode import EncodeConfig  # noqa: E402
from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from megatron_ext.data.records import RecordKeys  # noqa: E402
from megatron_ext.errors import ConfigError  # noqa: E402
from megatron_ext.tokenizers import TokenizerArgs, TokenizerConfig  # noqa: E402


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> ConfigParser:
    """Flags derived from the configs' fields; only the sections and the defaults that
    differ on the command line (required tokenizer, all CPUs) are set here."""
    parser = ConfigParser(
        prog="preprocess_instruct_data.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nEvery flag may also be spelled with - for _.",
    )
    for title in ("input data", "chat format", "tokenizer", "output data", "runtime"):
        parser.section(title)
    parser.add_config(PreprocessConfig, "runtime", overrides={
        "inputs": {"group": "input data"},
        "output_prefix": {"group": "output data"},
        "rejects_file": {"group": "output data"},
        "strict": {"group": "output data"},
        "workers": {"default": _available_cpus(),
                    "help": "tokenizer processes; output is identical for any number "
                            "(default: the CPUs available, %(default)s)"}})
    parser.add_config(RecordKeys, "input data")
    parser.add_config(EncodeConfig, "chat format", overrides={
        "max_seq_length": {"group": "output data"}, "overlong": {"group": "output data"}})
    parser.add_config(TokenizerArgs, "tokenizer", overrides={
        "tokenizer_type": {"default": None, "help": "one of SentencePieceTokenizer, "
                           "HFTokenizer (with --vocab_file)"}})
    parser.section("tokenizer").add_argument(
        "--tokenizer_from", metavar="MODEL",
        help="the tokenizer the trainer uses with MODEL: a Hugging Face model directory, a "
             ".gguf file or a checkpoint of this project (instead of --tokenizer_type/"
             "--vocab_file; --vocab_extra_ids_list adds tokens as the import does)")
    parser.section("output data").add_argument(
        "--dataset_impl", default="mmap", choices=["mmap"],
        help="accepted for Megatron-LLM compatibility; always mmap")
    return parser


_OWN_TOKENIZER_FLAGS = {"tokenizer_type": None, "vocab_file": None, "new_tokens": True,
                        "megatron_llm_specials": True}


@contextlib.contextmanager
def model_tokenizer(args: argparse.Namespace) -> Iterator[Optional[TokenizerConfig]]:
    """``--tokenizer_from``'s tokenizer while the context lasts (None without the flag)."""
    if args.tokenizer_from is None:
        if args.vocab_file is None or args.tokenizer_type is None:
            raise ConfigError("give the tokenizer: --tokenizer_from MODEL (the model to "
                              "finetune), or --tokenizer_type and --vocab_file")
        yield None
        return
    given = [name for name, default in _OWN_TOKENIZER_FLAGS.items()
             if getattr(args, name) != default]
    if given:
        raise ConfigError(f"--tokenizer_from takes the model's tokenizer as the trainer does: "
                          f"leave out {', '.join(_flag(n) for n in given)}")
    from megatron_ext.launch.base_model import tokenizer_of_model

    with tokenizer_of_model(args.tokenizer_from, args.vocab_extra_ids_list) as tokenizer:
        yield tokenizer


def _flag(name: str) -> str:
    return f"--no_{name}" if isinstance(_OWN_TOKENIZER_FLAGS[name], bool) else f"--{name}"


def config_from_args(args: argparse.Namespace,
                     tokenizer: Optional[TokenizerConfig] = None) -> PreprocessConfig:
    """The run's configuration; ``tokenizer``: the one of ``--tokenizer_from``, else the
    tokenizer flags'."""
    template = unescape_template(args.prompt_template) if args.prompt_template else None
    tokenizer = tokenizer or build_config(TokenizerArgs, args).config()
    encode = build_config(EncodeConfig, args, tokenizer=tokenizer,
                          chat_format="template" if template is not None else args.chat_format,
                          prompt_template=template)
    return build_config(PreprocessConfig, args, encode=encode)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    with model_tokenizer(args) as tokenizer:
        summary = run_preprocess(config_from_args(args, tokenizer))
    print(summary.table())
    return 0


def console_main() -> None:
    run_cli(main)


if __name__ == "__main__":
    console_main()
