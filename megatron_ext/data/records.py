"""Reading JSONL instruction records and turning them into conversations.

Why: the first arrow of the pipeline. Input files are streamed in chunks of
raw lines (the parent never parses JSON: workers do), and every line either
becomes a :class:`Conversation` or a :class:`RecordError` that names the
reason, so the preprocessor can skip, count, report or stop on bad input.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import io
import itertools
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from megatron_ext.cli import option
from megatron_ext.errors import DataError

logger = logging.getLogger(__name__)

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
    """Which JSON keys hold the conversation (Megatron-LLM's flag names); None: not given,
    so :func:`resolve_record_keys` detects the format from the first records."""

    question: Optional[str] = option(
        None, "key of the user question (default: detected, see 'record formats')",
        names=("--question_key",))
    answer: Optional[str] = option(None, "key of the answer, the training target (default: "
                                         "detected)", names=("--answer_key",))
    system: Optional[str] = option(
        None, "key of an optional system prompt; absent or empty means none (megatron-llm "
              "format renders an empty one, as Megatron-LLM does)", names=("--system_key",))
    messages: Optional[str] = option(
        None, "key of a multi-turn list of {role, content} (OpenAI) or {from, value} "
              "(ShareGPT) messages; replaces question/answer keys. Every assistant turn is a "
              "target", names=("--messages_key",))
    context: Optional[str] = option(
        None, "key of an optional text joined to the question after a blank line (Alpaca's "
              "'input')", names=("--context_key",))

    @property
    def given(self) -> bool:
        """Whether the conversation's keys were given (else they are detected)."""
        return self.question is not None or self.answer is not None \
            or self.messages is not None


@dataclass(frozen=True)
class RecordFormat:
    """A record layout recognised by its keys (:data:`RECORD_FORMATS`)."""

    description: str
    signature: tuple[str, ...]  # keys every record of the format has
    keys: RecordKeys


RECORD_FORMATS = (  # the first whose signature a record has is its format
    RecordFormat("OpenAI messages ({role, content} list under 'messages')",
                 ("messages",), RecordKeys(messages="messages")),
    RecordFormat("ShareGPT conversations ({from, value} list under 'conversations')",
                 ("conversations",), RecordKeys(messages="conversations", system="system")),
    RecordFormat("Alpaca instruction/input/output",
                 ("instruction", "output"),
                 RecordKeys("instruction", "output", "system", context="input")),
    RecordFormat("input/output (NeMo)", ("input", "output"),
                 RecordKeys("input", "output", "system")),
    RecordFormat("question/answer(/system)", ("question", "answer"),
                 RecordKeys("question", "answer", "system")),
)
FORMATS_HELP = "; ".join(f.description for f in RECORD_FORMATS)
DETECT_RECORDS = 50  # records read to detect (or check) the format of a file
_QUESTION_NAMES = ("question", "input", "instruction", "prompt")
_ANSWER_NAMES = ("answer", "output", "response", "completion")


def join_context(question: str, context: Optional[str]) -> str:
    """Alpaca's user turn: the instruction, then its input after a blank line (if any)."""
    if context is None or not context.strip():
        return question
    return f"{question}\n\n{context}"


def format_of(record: dict) -> Optional[RecordFormat]:
    """The format whose keys ``record`` has, or None."""
    return next((f for f in RECORD_FORMATS if all(k in record for k in f.signature)), None)


def first_records(path: str, limit: int = DETECT_RECORDS) -> list[tuple[int, dict]]:
    """(line, object) of the first ``limit`` lines of ``path`` that hold a JSON object
    (other lines are left to the preprocessor, which rejects them with their reason)."""
    out = []
    try:
        with open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict):
                    out.append((number, record))
                    if len(out) >= limit:
                        break
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return out


def _key_list(records: list[tuple[int, dict]]) -> str:
    seen: dict[str, None] = {}
    for _, record in records:
        seen.update(dict.fromkeys(record))
    return ", ".join(repr(k) for k in seen) or "none"


def detect_format(path: str) -> tuple[RecordFormat, int]:
    """The record format of ``path`` from its first records, and how many were read; a
    :class:`DataError` for records of no known format, or of two formats."""
    records = first_records(path)
    found: Optional[tuple[int, RecordFormat]] = None
    for line, record in records:
        fmt = format_of(record)
        if fmt is None:
            continue  # left to the preprocessor to reject with its reason
        if found is None:
            found = (line, fmt)
        elif fmt is not found[1]:
            raise DataError(
                f"{path}:{line}: a record in the {fmt.description} format, but line "
                f"{found[0]} is in the {found[1].description} format; one file holds one "
                "record format: convert the records, or give the keys (--question_key/"
                "--answer_key or --messages_key) so that the others are rejected")
    if found is None:
        what = (f"its first {len(records)} records have the keys {_key_list(records)}"
                if records else "it has no JSON object record")
        raise DataError(
            f"{path}: no known record format ({what}); the formats detected are: "
            f"{FORMATS_HELP}. Rename the keys, or give them with --question_key/--answer_key "
            "(or --messages_key for a list of messages)")
    return found[1], len(records)


def _check_keys(path: str, keys: RecordKeys) -> None:
    """Given keys that no first record of ``path`` has: name the keys the records do have."""
    records = first_records(path)
    wanted = ([keys.messages] if keys.messages is not None else [keys.question, keys.answer])
    if not records or any(all(k in r for k in wanted) for _, r in records):
        return
    formats = {f.description for f in map(format_of, (r for _, r in records)) if f}
    hint = (f"; they look like {' and '.join(sorted(formats))} records: leave out the key "
            "flags to read them so" if formats else "")
    flags = "--messages_key" if keys.messages is not None else "--question_key/--answer_key"
    raise DataError(
        f"{path}: none of the first {len(records)} records has the key(s) "
        f"{', '.join(repr(k) for k in wanted)} ({flags}); their keys are "
        f"{_key_list(records)}{hint}")


def _complete(keys: RecordKeys, path: str) -> RecordKeys:
    """Given question or answer key: the other one from the names the first record has."""
    if keys.messages is not None or (keys.question is not None and keys.answer is not None):
        return keys
    records = first_records(path, 1)
    record = records[0][1] if records else {}

    def pick(names: tuple[str, ...], flag: str) -> str:
        for name in names:
            if name in record:
                return name
        raise DataError(f"{path}: give {flag} too: the first record has none of "
                        f"{', '.join(map(repr, names))} (its keys: {_key_list(records)})")

    return dataclasses.replace(
        keys, question=keys.question or pick(_QUESTION_NAMES, "--question_key"),
        answer=keys.answer or pick(_ANSWER_NAMES, "--answer_key"))


def resolve_record_keys(keys: RecordKeys, files: Sequence[str]) -> RecordKeys:
    """The keys to read ``files`` with (the detected format is logged).

    No conversation keys given: the format is detected from each file's first records
    (:data:`RECORD_FORMATS`), the same for every file; a given system or context key
    replaces the format's. Keys given: checked against the first records, so that keys
    which match nothing name the keys the records have instead of rejecting every record.
    """
    if keys.given:
        keys = _complete(keys, files[0]) if files else keys
        for path in files:
            _check_keys(path, keys)
        return keys
    detected: Optional[tuple[str, RecordFormat]] = None
    for path in files:
        fmt, count = detect_format(path)
        if detected is not None and fmt is not detected[1]:
            raise DataError(f"{path} holds {fmt.description} records, {detected[0]} "
                            f"{detected[1].description} records: give files of one format")
        detected = (path, fmt)
        logger.info("%s: %s records (detected from its first %d)", path, fmt.description, count)
    if detected is None:
        return keys
    fmt = detected[1]
    return dataclasses.replace(
        fmt.keys, system=keys.system if keys.system is not None else fmt.keys.system,
        context=keys.context if keys.context is not None else fmt.keys.context)


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
            raise RecordError("missing_key", f"missing key {keys.messages!r}"
                                             + _format_hint(record))
        messages.extend(_parse_messages(record[keys.messages], keys.messages, keep_empty_system))
        if not any(m.role == ASSISTANT for m in messages):
            raise RecordError("no_assistant_turn", f"{keys.messages!r} has no assistant turn")
        return tuple(messages)

    for key, role in ((keys.question, USER), (keys.answer, ASSISTANT)):
        if key not in record:
            raise RecordError("missing_key", f"missing key {key!r}" + _format_hint(record))
        value = _text(record[key], f"key {key!r}")
        if not value.strip():
            raise RecordError("empty_text", f"key {key!r} is empty")
        if role == USER and keys.context is not None and record.get(keys.context) is not None:
            value = join_context(value, _text(record[keys.context], f"key {keys.context!r}"))
        messages.append(Message(role, value))
    return tuple(messages)


def _format_hint(record: dict) -> str:
    """For a record missing a key: the other format it is in, if any."""
    fmt = format_of(record)
    return (f" (the record is in the {fmt.description} format: one file holds one record "
            "format)" if fmt is not None else "")


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
