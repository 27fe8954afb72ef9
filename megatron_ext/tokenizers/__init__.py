"""Tokenizers (floor 1): one interface over SentencePiece and Hugging Face, training, conversion.

Rooms: ``base`` (the interface, both kinds, :func:`build_tokenizer`),
``training`` (small tokenizers trained from data, for demos and tests),
``conversion`` (a SentencePiece model as an equal Hugging Face ``tokenizers``
pipeline). This face re-exports the interface.
"""

from megatron_ext.tokenizers.base import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG,
    HUGGINGFACE,
    SENTENCEPIECE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_TYPES,
    HFTokenizer,
    InstructTokenizer,
    SentencePieceTokenizer,
    TokenizerArgs,
    TokenizerConfig,
    build_tokenizer,
    canonical_tokenizer_type,
    file_sha256,
    megatron_llm_specials_hint,
    parse_extra_ids,
    read_tokenizer_config,
    tokenizer_type_of_file,
)

__all__ = [
    "CHAT_TEMPLATE_FILE", "GENERATION_CONFIG", "SENTENCEPIECE_FILE", "SPECIAL_TOKENS_MAP",
    "TOKENIZER_CONFIG", "TOKENIZER_JSON", "read_tokenizer_config",
    "HUGGINGFACE", "SENTENCEPIECE", "TOKENIZER_TYPES", "HFTokenizer", "InstructTokenizer",
    "SentencePieceTokenizer", "TokenizerArgs", "TokenizerConfig", "build_tokenizer", "canonical_tokenizer_type",
    "file_sha256", "megatron_llm_specials_hint", "parse_extra_ids", "tokenizer_type_of_file",
]
