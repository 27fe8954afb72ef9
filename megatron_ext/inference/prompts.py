"""Prompts and references for generation and evaluation, tokenized as in training.

Why: a finetuned model only behaves as trained when its prompt is rendered
with the chat format of its data *and* tokenized the same way preprocessing
tokenized it (segment by segment, dummy prefix only at the document start; or, for
a model's own chat template, as one text, as ``apply_chat_template`` does).
This module turns command-line prompts and JSONL records into those ids, and
reads evaluation references, with clear errors naming file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.chat_formats import ChatFormat
from megatron_ext.data.records import ASSISTANT, ROLE_IDS, SYSTEM, USER, Message, join_context
from megatron_ext.errors import DataError
from megatron_ext.tokenizers import InstructTokenizer


@dataclass
class PromptRecord:
    where: str  # "file:line" or "--prompt N", for messages
    prompt: object  # as given: a string or a message list (echoed in the output)
    conversation: tuple[Message, ...]  # ends with a user turn
    answers: tuple[str, ...] = ()  # references (evaluation)


def _messages(value, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DataError(f"{where}: every message must be an object with role and content")
        role = {"human": USER, "gpt": ASSISTANT, "prompter": USER}.get(
            turn.get("role") or turn.get("from"), turn.get("role") or turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in (SYSTEM, USER, ASSISTANT) or not isinstance(content, str):
            raise DataError(f"{where}: message {turn!r:.80} needs role system/user/assistant "
                            "and a string content")
        out.append(Message(role, content))
    return out


def record_from_json(obj: dict, where: str, keys: dict) -> PromptRecord:
    """One JSONL record: ``{question|prompt, [system], [answer|answers]}`` or ``{messages}``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    answers = obj.get(keys["answer"], obj.get("answers"))
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and not (isinstance(answers, list)
                                    and all(isinstance(a, str) for a in answers)):
        raise DataError(f"{where}: '{keys['answer']}' must be a string or a list of strings")
    if keys["messages"] in obj:
        messages = _messages(obj[keys["messages"]], where)
        if messages[-1].role == ASSISTANT:  # the reference answer
            answers = answers or [messages[-1].content]
            messages = messages[:-1]
        if not messages or messages[-1].role != USER:
            raise DataError(f"{where}: the messages must end with a user turn")
        return PromptRecord(where, obj[keys["messages"]], tuple(messages), tuple(answers or ()))
    question = obj.get(keys["question"], obj.get("prompt"))
    if not isinstance(question, str):
        raise DataError(f"{where}: missing key '{keys['question']}' (or 'prompt', or "
                        f"'{keys['messages']}'); found {', '.join(obj) or 'no keys'}")
    context = obj.get(keys["context"]) if keys.get("context") else None
    if isinstance(context, str):  # Alpaca's input, joined as preprocessing joins it
        question = join_context(question, context)
    conversation = [Message(USER, question)]
    system = obj.get(keys["system"])
    if isinstance(system, str) and system:
        conversation.insert(0, Message(SYSTEM, system))
    return PromptRecord(where, question, tuple(conversation), tuple(answers or ()))


def read_records(path: str, question_key: str = "question", answer_key: str = "answer",
                 system_key: str = "system", messages_key: str = "messages",
                 context_key: Optional[str] = None) -> list[PromptRecord]:
    keys = {"question": question_key, "answer": answer_key, "system": system_key,
            "messages": messages_key, "context": context_key}
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
                records.append(record_from_json(obj, where, keys))
    except FileNotFoundError:
        raise DataError(f"--input {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def prompt_ids(fmt: Optional[ChatFormat], tokenizer: InstructTokenizer,
               record: PromptRecord) -> list[int]:
    """The ids the model continues: the chat-formatted prompt, or (fmt None) the raw text
    with the BOS where the tokenizer's own convention puts one (``adds_bos``), as
    ``transformers`` and llama.cpp tokenize it."""
    if fmt is None:
        text = record.prompt if isinstance(record.prompt, str) else "\n".join(
            m.content for m in record.conversation)
        bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
        return bos + tokenizer.encode_segments([text], [True])[0]
    segments = fmt.generation_prompt_segments(record.conversation)
    return _encode(fmt, segments)[0]


def conversation_ids(fmt: ChatFormat, tokenizer: InstructTokenizer,
                     conversation: tuple[Message, ...]) -> tuple[list[int], list[int]]:
    """(token ids, role id per token) of a whole conversation, as preprocessing writes it."""
    return _encode(fmt, fmt.render(conversation))


def _encode(fmt: ChatFormat, segments) -> tuple[list[int], list[int]]:
    tokens, roles, _ = fmt.encode([segments])
    return tokens.tolist(), roles.tolist()


ASSISTANT_ROLE = ROLE_IDS[ASSISTANT]
