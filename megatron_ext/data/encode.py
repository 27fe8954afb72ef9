"""Worker side of the preprocessor: raw lines in, token and role arrays out.

Why a module of its own: this is everything a worker process runs, and it
imports neither torch nor megatron-core, so workers start fast. A chunk
comes back as three flat arrays (tokens, roles, per-record lengths) so the
parent writes it with one call per stream instead of one per record: the
parent stays nearly idle and the workers get the CPU.
"""

from __future__ import annotations

import codecs
import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_ext.cli import option
from megatron_ext.data.chat_formats import CHAT_FORMAT_NAMES, FORMATS, build_chat_format
from megatron_ext.data.indexed import text_dtype_for
from megatron_ext.data.records import ROLE_IDS, LineChunk, RecordError, RecordKeys, parse_line
from megatron_ext.tokenizers import InstructTokenizer, TokenizerConfig, build_tokenizer

_ASSISTANT = ROLE_IDS["assistant"]


@dataclass(frozen=True)
class EncodeConfig:
    """What a worker needs; small and picklable."""

    tokenizer: TokenizerConfig
    keys: RecordKeys
    chat_format: str = option(
        "chatml", "how a conversation becomes text (default: %(default)s). "
                  + "; ".join(f"{name}: {cls.description}" for name, cls in FORMATS.items()),
        choices=CHAT_FORMAT_NAMES)
    prompt_template: Optional[str] = option(
        None, "single-turn template with {system}, {input} and {output} placeholders, e.g. "
              "'User: {input}\\nAssistant: {output}</s>'; \\n and \\t are unescaped; implies "
              "--chat_format template")
    max_seq_length: Optional[int] = option(
        None, "longest record in tokens; longer ones follow --overlong")
    overlong: str = option(
        "drop", "drop over-long records (counted as rejects), or truncate their end; a record "
                "whose prompt alone fills --max_seq_length is always rejected, never kept "
                "without its answer (default: %(default)s)", choices=("drop", "truncate"))


@dataclass
class Reject:
    file_index: int
    line: int
    code: str
    message: str
    raw: bytes


@dataclass
class ChunkResult:
    file_index: int
    first_line: int
    lines: int
    nbytes: int
    tokens: np.ndarray  # all accepted records concatenated, in the .bin dtype
    roles: np.ndarray  # uint8, same length as tokens
    lengths: np.ndarray  # int32, one per accepted record
    rejects: list[Reject] = field(default_factory=list)
    truncated: int = 0


class Encoder:
    """Parses, formats and tokenizes chunks; one per worker process."""

    def __init__(self, config: EncodeConfig, tokenizer: Optional[InstructTokenizer] = None):
        self.config = config
        self.tokenizer = tokenizer or build_tokenizer(config.tokenizer)
        self.format = build_chat_format(config.chat_format, self.tokenizer, config.prompt_template)
        # results travel to the parent already in the file's dtype (half the bytes for uint16)
        self.token_dtype = text_dtype_for(self.tokenizer.vocab_size)

    def encode_chunk(self, chunk: LineChunk) -> ChunkResult:
        keys, keep_empty_system = self.config.keys, self.format.keep_empty_system
        rejects: list[Reject] = []
        accepted: list[tuple[int, list[tuple[str, int]], bytes]] = []
        for offset, raw in enumerate(chunk.lines):
            line = chunk.first_line + offset
            if line == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                segments = self.format.render(parse_line(raw, keys, keep_empty_system))
            except RecordError as err:
                rejects.append(Reject(chunk.file_index, line, err.code, err.message, raw))
                continue
            accepted.append((line, segments, raw))

        tokens, roles, lengths = self.format.encode([segments for _, segments, _ in accepted])
        offsets = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)

        truncated = 0
        limit = self.config.max_seq_length
        if limit is not None and (lengths > limit).any():
            keep_token = np.ones(len(tokens), dtype=bool)
            keep_record = np.ones(len(lengths), dtype=bool)
            for index in np.nonzero(lengths > limit)[0]:
                start, length = int(offsets[index]), int(lengths[index])
                problem = self._overlong(length, roles[start:start + length])
                if problem:
                    line, _, raw = accepted[index]
                    rejects.append(Reject(chunk.file_index, line, "too_long", problem, raw))
                    keep_token[start:start + length] = False
                    keep_record[index] = False
                else:
                    keep_token[start + limit:start + length] = False
                    lengths[index] = limit
                    truncated += 1
            tokens, roles, lengths = tokens[keep_token], roles[keep_token], lengths[keep_record]
        rejects.sort(key=lambda r: r.line)
        return ChunkResult(
            file_index=chunk.file_index,
            first_line=chunk.first_line,
            lines=len(chunk.lines),
            nbytes=chunk.nbytes,
            tokens=tokens.astype(self.token_dtype, copy=False),
            roles=roles,
            lengths=lengths,
            rejects=rejects,
            truncated=truncated,
        )

    def _overlong(self, length: int, roles: np.ndarray) -> Optional[str]:
        """Why an over-long record must be rejected, or None if it may be truncated."""
        limit = self.config.max_seq_length
        if self.config.overlong == "drop":
            return f"{length} tokens, longer than --max_seq_length {limit} (--overlong drop)"
        if not (roles[:limit] == _ASSISTANT).any():
            first_answer = int(np.argmax(roles == _ASSISTANT))
            return (f"{length} tokens and the prompt alone takes {first_answer}: truncating to "
                    f"--max_seq_length {limit} would remove the whole answer")
        return None


_WORKER: Optional[Encoder] = None


def init_worker(config: EncodeConfig) -> None:
    """Pool initializer: the parent handles Ctrl-C; tokenizers use one thread.

    SIGTERM goes back to its default (die at once): a forked worker would
    otherwise inherit the parent's handler and could block the pool's
    ``terminate()`` forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER
    _WORKER = Encoder(config)


def encode_chunk_in_worker(chunk: LineChunk) -> ChunkResult:
    assert _WORKER is not None, "init_worker was not called"
    return _WORKER.encode_chunk(chunk)
