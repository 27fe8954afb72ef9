#!/usr/bin/env python3
"""Generate answers from a checkpoint, with the chat format its data was built with.

Prompts come from --prompt (repeatable) or a JSONL file (question/prompt with an
optional system, or an OpenAI/ShareGPT messages list). Decoding is incremental
with a key-value cache; it stops at the chat format's end-of-turn token (or
EOS) or after --max_new_tokens. Each output line holds the prompt, the
generated text and the generated token ids.

examples:
  python tools/generate.py --load runs/sft/checkpoints --prompt "What is RoPE?" --greedy
  torchrun --nproc_per_node 2 tools/generate.py --load runs/sft/checkpoints \\
      --tensor_model_parallel_size 2 --input prompts.jsonl --output answers.jsonl \\
      --temperature 0.7 --top_p 0.9 --max_new_tokens 256
  python tools/generate.py --load ckpt --raw --prompt "Once upon a time" --greedy
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import FlagParser, run_cli, setup_logging  # noqa: E402


def add_model_arguments(parser: FlagParser) -> None:
    """Flags shared by generate.py and evaluate.py."""
    parser.add_argument("--load", required=True,
                        help="checkpoint (a run's --save directory, an unsharded or a legacy "
                             "checkpoint)")
    parser.add_argument("--tensor_model_parallel_size", type=int,
                        default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="TP size (default: all processes torchrun started)")
    parser.add_argument("--chat_format", default=None,
                        help="chatml, megatron-llm, llama3, alpaca (default: the training "
                             "data's, from its -meta.json)")
    parser.add_argument("--prompt_template", default=None,
                        help="the preprocessing --prompt_template, for --chat_format template")
    parser.add_argument("--vocab_file", default=None,
                        help="tokenizer file, when the one named in the checkpoint has moved")
    parser.add_argument("--question_key", default="question",
                        help="JSONL key of the question (\"prompt\" is also accepted)")
    parser.add_argument("--answer_key", default="answer",
                        help="JSONL key of the reference answer (or a list; also \"answers\")")
    parser.add_argument("--system_key", default="system", help="JSONL key of the system prompt")
    parser.add_argument("--messages_key", default="messages",
                        help="JSONL key of an OpenAI/ShareGPT message list (instead of a "
                             "question); a final assistant turn is the reference")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="most tokens generated per prompt (the end-of-turn token ends "
                             "earlier)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default "
                        "unless --temperature/--top_k/--top_p are given; --temperature 0 too)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample with this temperature (0: greedy)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample from the smallest set of tokens with this total "
                             "probability (nucleus sampling; 1: all)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="sampling seed (the same seed gives the same output)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the model in bfloat16 (half the memory; default fp32)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def sampling_params(args):
    from megatron_ext.errors import ConfigError
    from megatron_ext.inference.generation import SamplingParams

    if args.temperature == 0:  # as in transformers and vLLM: temperature 0 means argmax
        args.temperature, args.greedy = None, True
    sampling = args.temperature is not None or args.top_k or args.top_p < 1.0
    if args.greedy and sampling:
        raise ConfigError("--greedy excludes --temperature/--top_k/--top_p")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=not sampling,
                            temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return params


def load_model_and_format(args, raw: bool = False):
    import logging

    from megatron_ext.checkpointing.run_config import chat_settings_of_run
    from megatron_ext.data.chat_formats import build_chat_format
    from megatron_ext.errors import ConfigError
    from megatron_ext.inference.loading import load_for_inference

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tensor_model_parallel_size:
        raise ConfigError(f"{world} processes but --tensor_model_parallel_size "
                          f"{args.tensor_model_parallel_size}: generation runs one model copy "
                          "(PP=1, no data parallelism); start as many processes as TP ranks")
    loaded = load_for_inference(args.load, args.tensor_model_parallel_size, 1,
                                vocab_file=args.vocab_file, bf16=args.bf16)
    if raw:
        return loaded, None
    name, template = chat_settings_of_run(loaded.run_config)
    if not args.chat_format and name is None:
        logging.getLogger("generate").warning(
            "the checkpoint does not record its data's chat format: using chatml (pass "
            "--chat_format, or --raw for a base model)")
    name = args.chat_format or name or "chatml"
    fmt = build_chat_format(name, loaded.tokenizer, args.prompt_template or (
        template if not args.chat_format else None))
    fmt.check()
    return loaded, fmt


def main(argv=None) -> int:
    parser = FlagParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n\n", 1)[1])
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--input", help="JSONL file of prompts")
    parser.add_argument("--system", default=None, help="system message for --prompt")
    parser.add_argument("--raw", action="store_true",
                        help="feed the prompt text as it is, without the chat format")
    parser.add_argument("--output", default=None, help="JSONL output (default: print)")
    args = parser.parse_args(argv)
    setup_logging()
    params = sampling_params(args)
    from megatron_ext.inference.batch import generate_records
    from megatron_ext.io import write_jsonl
    from megatron_ext.inference.prompts import read_records, record_from_json

    if args.input:
        records = read_records(args.input, args.question_key, args.answer_key, args.system_key,
                               args.messages_key)
    else:
        keys = {"question": "question", "answer": "answer", "system": "system",
                "messages": "messages"}
        records = [record_from_json({"question": p, "system": args.system}, f"--prompt {i}",
                                    keys) for i, p in enumerate(args.prompt, 1)]
    loaded, fmt = load_model_and_format(args, raw=args.raw)
    rows = generate_records(loaded, fmt, records, params, args.batch_size,
                            progress=not args.no_progress)
    if loaded.layout.is_logger:
        if args.output:
            write_jsonl(args.output, rows)
            stopped = sum(r["stop_reason"] == "stop" for r in rows)
            print(f"wrote {len(rows)} generations to {args.output} ({stopped} ended at the "
                  f"end-of-turn token, {len(rows) - stopped} at --max_new_tokens)")
        else:
            import json

            for row in rows:
                print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
