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

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import ConfigParser, build_config, run_cli, setup_logging  # noqa: E402
from megatron_ext.inference.options import (  # noqa: E402
    InferenceOptions,
    add_inference_options,
    load_model_and_format,
)
from megatron_ext.startup import heavy_imports  # noqa: E402


def main(argv=None) -> int:
    parser = ConfigParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 1)[1])
    add_inference_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--input", help="JSONL file of prompts")
    parser.add_argument("--system", default=None, help="system message for --prompt")
    parser.add_argument("--raw", action="store_true",
                        help="feed the prompt text as it is, without the chat format")
    parser.add_argument("--output", default=None, help="JSONL output (default: print)")
    args = parser.parse_args(argv)
    options = build_config(InferenceOptions, args)
    setup_logging()
    params = options.sampling_params()
    with heavy_imports("torch"):
        from megatron_ext.inference.batch import generate_records
    from megatron_ext.inference.prompts import record_from_json
    from megatron_ext.io import write_jsonl

    if args.input:
        records = options.read_records(args.input)
    else:
        keys = {"question": "question", "answer": "answer", "system": "system",
                "messages": "messages"}
        records = [record_from_json({"question": p, "system": args.system}, f"--prompt {i}",
                                    keys) for i, p in enumerate(args.prompt, 1)]
    loaded, fmt = load_model_and_format(options, raw=args.raw)
    generations = generate_records(loaded, fmt, records, params, options.batch_size,
                                   progress=options.progress)
    if loaded.layout.is_logger:
        if args.output:
            write_jsonl(args.output, [g.to_json() for g in generations])
            stopped = sum(g.stop_reason == "stop" for g in generations)
            print(f"wrote {len(generations)} generations to {args.output} ({stopped} ended at "
                  f"the end-of-turn token, {len(generations) - stopped} at --max_new_tokens)")
        else:
            for generation in generations:
                print(json.dumps(generation.to_json(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
