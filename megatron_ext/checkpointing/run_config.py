"""A checkpoint's ``run_config.json``: read, written, and what it says about the tokenizer.

Why here: every checkpoint form (dist iteration directories, the unsharded
file set) carries the run's arguments in ``run_config.json``; the trainer,
the converters and the inference tools read it through :func:`load_run_config`
and rebuild the tokenizer a checkpoint was made with the same way (a
converted checkpoint carries its tokenizer files beside the weights).
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_ext.data.hf_chat import ChatTemplateError, find_chat_template
from megatron_ext.data.indexed import chat_settings_of_meta, read_meta
from megatron_ext.errors import CheckpointError, ConfigError, DataError
from megatron_ext.io import read_json, write_json
from megatron_ext.tokenizers import (
    HUGGINGFACE,
    SENTENCEPIECE,
    InstructTokenizer,
    TokenizerArgs,
    TokenizerConfig,
    tokenizer_type_of_file,
)

RUN_CONFIG = "run_config.json"


def load_run_config(directory: str, missing_ok: bool = False) -> Optional[dict]:
    """The ``run_config.json`` in ``directory``; None when it is absent and ``missing_ok``.

    An unreadable file is a :class:`CheckpointError` naming it.
    """
    path = os.path.join(directory, RUN_CONFIG)
    if missing_ok and not os.path.exists(path):
        return None
    return read_json(path, CheckpointError)


def write_run_config(directory: str, run_config: dict) -> None:
    write_json(os.path.join(directory, RUN_CONFIG), run_config)


def tokenizer_config_from_run(load: str, run_config: dict,
                              vocab_file: Optional[str] = None) -> TokenizerConfig:
    """The tokenizer a checkpoint was trained or converted with.

    A relative ``vocab_file`` is looked up beside the checkpoint first (the
    converters copy the tokenizer there), then as given.
    """
    tok = run_config.get("tokenizer") or {}
    path = vocab_file or tok.get("vocab_file")
    if not path:
        raise ConfigError(f"{load}: the checkpoint does not name its tokenizer; pass --vocab_file")
    if not vocab_file and not os.path.isabs(path):
        beside = os.path.join(load, path)
        if os.path.exists(beside):
            path = beside
    # a tokenizer given here may be of another type than the recorded one (Megatron-LLM's
    # legacy files record SentencePiece whatever the model's tokenizer is)
    kind = ((tokenizer_type_of_file(vocab_file) if vocab_file else None)
            or tok.get("tokenizer_type") or tokenizer_type_of_file(path) or SENTENCEPIECE)
    return TokenizerArgs(tokenizer_type=kind,
                         vocab_file=path, vocab_extra_ids_list=tok.get("vocab_extra_ids_list"),
                         new_tokens=tok.get("new_tokens", True),
                         megatron_llm_specials=tok.get("megatron_llm_specials", True)).config()


def chat_settings_of_run(run_config: dict) -> tuple[Optional[str], Optional[str]]:
    """(chat format name, prompt template) of the run's training data, if known.

    Saved in the run config since it exists; older runs: read from the data's
    ``-meta.json`` when it is found from here.
    """
    chat = run_config.get("chat") or {}
    if chat.get("format"):
        return chat["format"], chat.get("prompt_template")
    data = run_config.get("data") or {}
    paths = list(data.get("train_data_path") or ()) + list(data.get("data_path") or ())
    for entry in paths:
        try:
            name, template = chat_settings_of_meta(read_meta(entry))
        except DataError:
            continue  # an unreadable meta.json here: the next path may tell
        if name:
            return name, template
    return None, None


def default_chat_format(tokenizer: InstructTokenizer) -> str:
    """The chat format for a checkpoint that records none (an imported model, or data made
    before formats were recorded): the tokenizer's own template (``hf``) when it has one,
    as an imported chat model does, else ``chatml``."""
    if tokenizer.config.tokenizer_type == HUGGINGFACE:
        try:
            if find_chat_template(tokenizer.source_file)[0] is not None:
                return "hf"
        except ChatTemplateError:
            pass  # an unreadable template: chatml, and --chat_format hf names the problem
    return "chatml"
