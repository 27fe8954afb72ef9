#!/usr/bin/env python3
"""Evaluate a checkpoint on question/answer records: answer loss and perplexity, exact match, F1.

For every record of --input (question/answer with an optional system, or a
messages list whose last assistant turn is the reference; "answers" may list
several references) it computes the loss of the reference answer's tokens
under the model (teacher forcing, the chat format of the training data) and,
unless --no_generate, generates an answer and scores it against the
references with SQuAD-style exact match and token F1. Prints a summary
table; --output keeps one JSON line per record.

examples:
  python tools/evaluate.py --load runs/sft/checkpoints --input data/sample/test.jsonl
  torchrun --nproc_per_node 2 tools/evaluate.py --load runs/sft/checkpoints \\
      --tensor_model_parallel_size 2 --input test.jsonl --output predictions.jsonl
"""

from __future__ import annotations

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


def format_summary(summary) -> str:
    """The summary table (``summary``: an :class:`EvaluationSummary`)."""
    rows = [("records", f"{summary.records} ({summary.with_reference} with a reference)"),
            ("answer loss", f"{summary.answer_loss:.4f}"),
            ("answer perplexity", f"{summary.answer_perplexity:.3f}"),
            ("answer tokens", str(summary.answer_tokens))]
    if summary.exact_match is not None:
        rows += [("exact match", f"{100 * summary.exact_match:.2f} %"),
                 ("token F1", f"{100 * summary.f1:.2f} %")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def main(argv=None) -> int:
    parser = ConfigParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                          epilog=__doc__.split("\n\n", 1)[1])
    add_inference_options(parser, max_new_tokens=64)
    parser.add_argument("--input", required=True, help="JSONL records with reference answers")
    parser.add_argument("--no_generate", action="store_true",
                        help="answer loss and perplexity only (no generation, no EM/F1)")
    parser.add_argument("--output", default=None, help="JSONL of per-record results")
    parser.add_argument("--summary_json", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    options = build_config(InferenceOptions, args)
    setup_logging()
    params = None if args.no_generate else options.sampling_params()
    with heavy_imports("torch"):
        from megatron_ext.inference.batch import evaluate_records
    from megatron_ext.io import write_json, write_jsonl

    records = options.read_records(args.input)
    loaded, fmt = load_model_and_format(options)
    rows, summary = evaluate_records(loaded, fmt, records, params, options.batch_size,
                                     progress=options.progress)
    if loaded.layout.is_logger:
        if args.output:
            write_jsonl(args.output, [row.to_json() for row in rows])
        if args.summary_json:
            write_json(args.summary_json, summary.to_json())
        print(f"evaluation of {options.load} on {args.input} (chat format {fmt.name}):")
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
