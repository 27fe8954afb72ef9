"""What ``tools/generate.py`` and ``tools/evaluate.py`` share: the checkpoint to load, the
chat format, the record keys and the decoding settings, as one config with its flags.

Why here and not in a tool: a tool never imports another, and both tools load the
model, pick the chat format and build sampling parameters the same way. Importing
this module costs no torch, so the tools' ``--help`` and flag errors stay fast; the
parts that need torch are imported inside the functions that run the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from megatron_ext.cli import ConfigParser, option
from megatron_ext.data.chat_formats import CHAT_FORMAT_NAMES, ChatFormat, build_chat_format
from megatron_ext.errors import ConfigError
from megatron_ext.inference.prompts import PromptRecord, read_records
from megatron_ext.parallel import ParallelArgs

if TYPE_CHECKING:  # torch-importing modules, for the type hints only
    from megatron_ext.inference.generation import SamplingParams
    from megatron_ext.inference.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    load: str = option(help="checkpoint (a run's --save directory, an unsharded or a legacy "
                            "checkpoint)")
    chat_format: Optional[str] = option(
        None, "hf is the tokenizer's own chat template, template the --prompt_template "
              "(default: the training data's, from its -meta.json)", choices=CHAT_FORMAT_NAMES)
    prompt_template: Optional[str] = option(
        None, "the preprocessing --prompt_template, for --chat_format template")
    vocab_file: Optional[str] = option(
        None, "tokenizer file, when the one named in the checkpoint has moved")
    question_key: str = option("question", "JSONL key of the question (\"prompt\" is also "
                                           "accepted)")
    answer_key: str = option("answer", "JSONL key of the reference answer (or a list; also "
                                       "\"answers\")")
    system_key: str = option("system", "JSONL key of the system prompt")
    messages_key: str = option("messages", "JSONL key of an OpenAI/ShareGPT message list "
                                           "(instead of a question); a final assistant turn "
                                           "is the reference")
    context_key: Optional[str] = option(None, "JSONL key of a text joined to the question "
                                              "after a blank line (Alpaca's \"input\")")
    batch_size: int = option(8, "prompts decoded together")
    max_new_tokens: int = option(256, "most tokens generated per prompt (the end-of-turn "
                                      "token ends earlier)")
    greedy: bool = option(False, "argmax decoding (the default unless --temperature/--top_k/"
                                 "--top_p are given; --temperature 0 too)")
    temperature: Optional[float] = option(None, "sample with this temperature (0: greedy)")
    top_k: int = option(0, "sample among the k most likely tokens (0: all)")
    top_p: float = option(1.0, "sample from the smallest set of tokens with this total "
                               "probability (nucleus sampling; 1: all)")
    seed: int = option(1234, "sampling seed (the same seed gives the same output)")
    bf16: bool = option(False, "run the model in bfloat16 (half the memory; default fp32)")
    # generation runs one model copy over the TP ranks: PP and CP stay 1
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    progress: bool = option(True, "no progress bar")

    def read_records(self, path: str) -> list[PromptRecord]:
        """The records of a JSONL file, read with these keys."""
        return read_records(path, self.question_key, self.answer_key, self.system_key,
                            self.messages_key, self.context_key)

    def sampling_params(self) -> "SamplingParams":
        """Greedy unless a sampling flag is given; ``--temperature 0`` means greedy, as in
        transformers and vLLM."""
        from megatron_ext.inference.generation import SamplingParams  # torch: see module doc

        temperature, greedy = self.temperature, self.greedy
        if temperature == 0:
            temperature, greedy = None, True
        sampling = temperature is not None or self.top_k or self.top_p < 1.0
        if greedy and sampling:
            raise ConfigError("--greedy excludes --temperature/--top_k/--top_p")
        params = SamplingParams(max_new_tokens=self.max_new_tokens, greedy=not sampling,
                                temperature=1.0 if temperature is None else temperature,
                                top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        try:
            params.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return params


def add_inference_options(parser: ConfigParser, max_new_tokens: int = 256) -> None:
    """The shared flags; TP defaults to every process torchrun started."""
    parser.add_config(InferenceOptions, overrides={
        "max_new_tokens": {"default": max_new_tokens}})
    parser.add_config(ParallelArgs, "parallel layout (one model copy: TP ranks only)", overrides={
        "tensor_model_parallel_size": {
            "default": int(os.environ.get("WORLD_SIZE", "1")),
            "help": "TP size (default: all processes torchrun started)"}})


def load_model_and_format(options: InferenceOptions, raw: bool = False
                          ) -> tuple["LoadedModel", Optional[ChatFormat]]:
    """The model on this rank's TP slice, and the chat format its data was made with
    (None with ``raw``: prompts go in as they are)."""
    from megatron_ext.checkpointing.run_config import (  # torch: module doc
        chat_settings_of_run,
        default_chat_format,
    )
    from megatron_ext.inference.loading import load_for_inference

    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = options.parallel
    if world != p.model_parallel_size or p.model_parallel_size != p.tensor_model_parallel_size:
        raise ConfigError(f"{world} processes but --tensor_model_parallel_size "
                          f"{p.tensor_model_parallel_size} x --pipeline_model_parallel_size "
                          f"{p.pipeline_model_parallel_size} x --context_parallel_size "
                          f"{p.context_parallel_size}: generation runs one model copy (PP=1, "
                          "CP=1, no data parallelism); start as many processes as TP ranks")
    loaded = load_for_inference(options.load, p.tensor_model_parallel_size, 1,
                                vocab_file=options.vocab_file, bf16=options.bf16)
    if raw:
        return loaded, None
    name, template = chat_settings_of_run(loaded.run_config)
    if not options.chat_format and name is None:
        name = default_chat_format(loaded.tokenizer)
        logger.warning("the checkpoint does not record its data's chat format: using %s "
                       "(pass --chat_format, or --raw for a base model)",
                       "the tokenizer's own chat template (hf)" if name == "hf" else name)
    name = options.chat_format or name
    fmt = build_chat_format(name, loaded.tokenizer, options.prompt_template or (
        template if not options.chat_format else None))
    fmt.check()
    return loaded, fmt
