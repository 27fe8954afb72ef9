"""Reading JSONL instruction records and turning them into conversations.

Why: the first arrow of the pipeline. Input files are streamed in chunks of
raw lines (the parent never parses JSON: workers do), and every line either
becomes a :class:`Conversation` or a :class:`RecordError` that names the
reason, so the preprocessor can skip, count, report or stop on bad input.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from megatron_ext.cli import option
from megatron_ext.errors import DataError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLE_IDS = {SYSTEM: 0, USER: 1, ASSISTANT: 2}
"""Role id per token in ``{prefix}-role``; Megatron-LLM's system/prompter/assistant."""

_ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
}


class RecordError(Exception):
    """A rejected input line; ``code`` groups reasons in the summary."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


Conversation = tuple[Message, ...]


@dataclass(frozen=True)
class RecordKeys:
    """Which JSON keys hold the conversation (Megatron-LLM's flag names)."""

    question: str = option("input", "key of the user question", names=("--question_key",))
    answer: str = option("output", "key of the answer, the training target",
                         names=("--answer_key",))
    system: Optional[str] = option(
        None, "key of an optional system prompt; absent or empty means none (megatron-llm "
              "format renders an empty one, as Megatron-LLM does)", names=("--system_key",))
    messages: Optional[str] = option(
        None, "key of a multi-turn list of {role, content} (OpenAI) or {from, value} "
              "(ShareGPT) messages; replaces question/answer keys. Every assistant turn is a "
              "target", names=("--messages_key",))


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``--input`` (paths or globs), in the order given."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise DataError(f"--input {pattern!r} matches no file")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            raise DataError(f"--input {pattern} is a directory: pass its files, or a glob like "
                            f"'{pattern.rstrip('/')}/*.jsonl'")
        else:
            raise DataError(f"input file {pattern} does not exist (check --input)")
    for path in files:
        if not os.access(path, os.R_OK):
            raise DataError(f"input file {path} is not readable")
    return files


def open_binary(path: str) -> io.BufferedIOBase:
    """Open ``.jsonl`` or ``.jsonl.gz`` for reading raw bytes."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


@dataclass
class LineChunk:
    """A run of raw lines from one file; ``first_line`` is 1-based."""

    file_index: int
    first_line: int
    lines: list[bytes]
    nbytes: int


def iter_chunks(files: Sequence[str], chunk_size: int) -> Iterator[LineChunk]:
    """Yield consecutive line chunks of every file, never loading a whole file."""
    for file_index, path in enumerate(files):
        line_no = 1
        try:
            with open_binary(path) as handle:
                while True:
                    lines = list(itertools.islice(handle, chunk_size))
                    if not lines:
                        break
                    yield LineChunk(file_index, line_no, lines, sum(map(len, lines)))
                    line_no += len(lines)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise DataError(f"{path}: cannot read after line {line_no - 1}: {exc}") from None


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError("not_a_string", f"{what} is {type(value).__name__}, expected a string")
    if _SURROGATES.search(value):  # only JSON escapes like "\ud800" can produce these
        raise RecordError("invalid_unicode",
                          f"{what} holds a lone surrogate (a \\ud800-\\udfff escape), "
                          "which is not valid Unicode")
    return value


_SURROGATES = re.compile("[\ud800-\udfff]")


def parse_line(raw: bytes, keys: RecordKeys, keep_empty_system: bool) -> Conversation:
    """One JSONL line to a conversation, or :class:`RecordError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise RecordError("blank_line", "blank line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError("malformed_json", f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise RecordError("malformed_json", "malformed JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"JSON {type(record).__name__}, expected an object")

    system = None
    if keys.system is not None and record.get(keys.system) is not None:
        system = _text(record[keys.system], f"system key {keys.system!r}")
        if not system.strip() and not keep_empty_system:
            system = None
    messages = [Message(SYSTEM, system)] if system is not None else []

    if keys.messages is not None:
        if keys.messages not in record:
            raise RecordError("missing_key", f"missing key {keys.messages!r}")
        messages.extend(_parse_messages(record[keys.messages], keys.messages, keep_empty_system))
        if not any(m.role == ASSISTANT for m in messages):
            raise RecordError("no_assistant_turn", f"{keys.messages!r} has no assistant turn")
        return tuple(messages)

    for key, role in ((keys.question, USER), (keys.answer, ASSISTANT)):
        if key not in record:
            raise RecordError("missing_key", f"missing key {key!r}")
        value = _text(record[key], f"key {key!r}")
        if not value.strip():
            raise RecordError("empty_text", f"key {key!r} is empty")
        messages.append(Message(role, value))
    return tuple(messages)


def _parse_messages(turns, key: str, keep_empty_system: bool) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_messages", f"{key!r} must be a non-empty list of messages")
    out = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RecordError("bad_messages", f"message {n} is not an object")
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
            names = ("role", "content")
        elif "from" in turn or "value" in turn:
            role, content = turn.get("from"), turn.get("value")
            names = ("from", "value")
        else:
            raise RecordError("bad_messages",
                              f"message {n} needs role/content (OpenAI) or from/value (ShareGPT) keys")
        if role is None or content is None:
            missing = names[0] if role is None else names[1]
            raise RecordError("missing_key", f"message {n} has no {missing!r}")
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise RecordError(
                "unknown_role",
                f"message {n} has unknown role {role!r} (expected system/user/assistant "
                "or system/human/gpt)",
            )
        role = _ROLE_ALIASES[role.lower()]
        content = _text(content, f"message {n} {names[1]!r}")
        if not content.strip():
            if role == SYSTEM and not keep_empty_system:
                continue
            if role != SYSTEM:
                raise RecordError("empty_text", f"message {n} ({role}) is empty")
        out.append(Message(role, content))
    return out
