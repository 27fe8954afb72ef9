"""A tokenizer's own Jinja chat template: finding it, rendering it as ``transformers``
does, and finding where each message landed in the rendered text.

Why: ``--chat_format hf`` trains on exactly the text that
``tokenizer.apply_chat_template`` produces at inference time, default system
prompt, date headers and ``<think>`` blocks included. A template does not
always render a conversation as a concatenation of its turns (Qwen3 writes an
empty ``<think>`` block before the *last* assistant turn only, Llama 3.1 adds
a date header to the system turn), so the roles come from *one* rendering of
the whole conversation: this module locates every message's content in it and
gives every character a role; :func:`token_roles` then maps characters to
tokens with the tokenizer's offsets.

How a message is located (:func:`locate_messages`): the template is rendered
twice, once with the real contents and once with a unique placeholder for
each content (this one is cached per conversation shape). The placeholder rendering is the conversation's *skeleton*:
the text the template writes around the contents (headers, default system
prompt, end-of-turn tokens). The real text is matched against the skeleton
piece by piece, left to right; what lies between two skeleton pieces is the
rendering of the message whose placeholder sat there (the template may have
trimmed it, or, like Qwen3 with a ``</think>`` in an answer, rewritten it).
A record whose real rendering does not follow its skeleton cannot be located.

Which characters are the assistant's (:func:`character_roles`): the content
of an assistant message, then the first special token right after it (the
end-of-turn token, ``<|im_end|>`` or ``<|eot_id|>``; whitespace between the
content and it included) and the whitespace that follows that token (the
``\\n`` after ``<|im_end|>``), the same characters the ``chatml`` format
gives its assistant segments except the header, which stays with the
prompt. Everything else takes the role of a non-assistant message: a
message's own content and end-of-turn, and the text before a message (its
header) the role of that message, or for an assistant's header the role of
the message before it. Text before the first message (BOS, a default system
prompt, a date header) takes the first message's role.

Rendering follows ``transformers`` (``chat_template_utils``): an immutable
sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a
``tojson`` that keeps non-ASCII, and the tokenizer's ``bos_token``,
``eos_token``, ``unk_token`` and ``pad_token`` as variables. A template is
compiled once per process (:func:`compile_chat_template` is cached), so
preprocessing workers never load ``transformers``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_ext.tokenizers import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, read_tokenizer_config

#: the tokenizer's named tokens a template sees (``transformers``' special_tokens_map)
TEMPLATE_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")

ASSISTANT_ROLE = "assistant"


class ChatTemplateError(Exception):
    """A template (or a record under it) that cannot be rendered or located; the caller
    turns it into a record reject or a configuration error."""


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template and the variables it is rendered with."""

    text: str
    source: str  # the file it was read from
    variables: dict = field(default_factory=dict)  # bos_token, eos_token, ... (strings)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return render_chat_template(self.text, messages, add_generation_prompt, **self.variables)


def find_chat_template(tokenizer_file: str) -> tuple[Optional[ChatTemplate], list[str]]:
    """The chat template beside ``tokenizer_file`` (a ``tokenizer.json``), and the files
    that were looked at.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``
    (as in ``transformers``); a list of named templates gives its ``default``.
    Returns ``(None, looked_at)`` when there is none. Raises
    :class:`ChatTemplateError` for a file that exists but cannot be read.
    """
    directory = Path(tokenizer_file).parent
    config_path = directory / TOKENIZER_CONFIG
    jinja_path = directory / CHAT_TEMPLATE_FILE
    config = read_tokenizer_config(str(directory), ChatTemplateError)
    variables = {}
    for name in TEMPLATE_VARIABLES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            variables[name] = value
    looked_at = [str(jinja_path), str(config_path)]
    if jinja_path.is_file():
        try:
            text = jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"cannot read {jinja_path}: {exc}") from None
        return ChatTemplate(text, str(jinja_path), variables), looked_at
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if "default" not in named:
            raise ChatTemplateError(
                f"{config_path} holds the chat templates {', '.join(map(str, named))} but none "
                "named 'default'")
        value = named["default"]
    if value is None:
        return None, looked_at
    if not isinstance(value, str):
        raise ChatTemplateError(f"{config_path}: chat_template is a {type(value).__name__}, "
                                "expected a string or a list of named templates")
    return ChatTemplate(value, str(config_path), variables), looked_at


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------
def render_chat_template(template: str, messages: Sequence[dict],
                         add_generation_prompt: bool = False, **variables) -> str:
    """Render ``template`` as ``transformers``' ``apply_chat_template(tokenize=False)``
    does (no tools, no documents). Raises ``jinja2.TemplateError`` as the template does."""
    return compile_chat_template(template).render(
        messages=[dict(m) for m in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """The compiled template, in an environment equal to ``transformers``' (module doc).

    Raises ``jinja2.TemplateSyntaxError`` for a template that does not parse.
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (markers only
        matter to ``return_assistant_tokens_mask``, which the located roles replace)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace without underscore attributes (CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's own signature trick: namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace ({name!r})")

    class DictMaker:
        """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = DictMaker()
    env.globals["namespace"] = Namespace
    return env.from_string(template)


# ---------------------------------------------------------------------------
# locating messages
# ---------------------------------------------------------------------------
def _placeholder(index: int) -> str:
    # private-use characters: no template strips, splits or escapes them
    return f"\ue000{index}\ue001"


_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


@dataclass(frozen=True)
class Rendering:
    """A rendered conversation and where each message's content is in it."""

    text: str
    spans: tuple[Optional[tuple[int, int]], ...]  # per message: [start, end), None if not rendered


def locate_messages(template: ChatTemplate, messages: Sequence[dict],
                    add_generation_prompt: bool = False) -> Rendering:
    """Render ``messages`` and locate every message's content (module doc).

    Raises ``jinja2.TemplateError`` when the template refuses the messages, and
    :class:`ChatTemplateError` when the rendering does not follow its skeleton.
    """
    text = template.render(messages, add_generation_prompt)
    key = (template.text, tuple(sorted(template.variables.items())),
           tuple(tuple(sorted((k, v) for k, v in m.items() if k != "content")) for m in messages),
           add_generation_prompt)
    skeleton = _skeleton(*key)
    try:
        return _locate(text, skeleton, messages)
    except ChatTemplateError:
        # a cached skeleton may be stale (strftime_now's date changed since it was made)
        fresh = _skeleton.__wrapped__(*key)
        if fresh == skeleton:
            raise
        _skeleton.cache_clear()
        return _locate(text, fresh, messages)


@functools.lru_cache(maxsize=256)
def _skeleton(template: str, variables: tuple, messages: tuple, add_generation_prompt: bool) -> str:
    """The rendering with a placeholder for each content: it only depends on the
    messages' roles (and other keys), so conversations of one shape share it."""
    probes = [dict(m, content=_placeholder(i)) for i, m in enumerate(messages)]
    return render_chat_template(template, probes, add_generation_prompt, **dict(variables))


def _locate(text: str, skeleton: str, messages: Sequence[dict]) -> Rendering:
    pieces = _PLACEHOLDER.split(skeleton)
    order = [int(index) for index in pieces[1::2]]
    literals = pieces[0::2]
    if len(set(order)) != len(order) or any(i >= len(messages) for i in order):
        raise ChatTemplateError("the chat template renders a message's content more than once")
    spans: list[Optional[tuple[int, int]]] = [None] * len(messages)
    if not text.startswith(literals[0]):
        raise ChatTemplateError("the chat template renders this conversation with another "
                                "structure than its placeholder rendering")
    position = len(literals[0])
    for slot, index in enumerate(order):
        after = literals[slot + 1]
        last = slot + 1 == len(order)
        end = _content_end(text, position, messages[index]["content"], after, last)
        if end is None:
            raise ChatTemplateError(
                f"message {index + 1} ({messages[index]['role']}) cannot be located in the "
                "rendered conversation")
        spans[index] = (position, end)
        position = end + len(after)
    return Rendering(text, tuple(spans))


def _content_end(text: str, start: int, content: str, after: str, last: bool) -> Optional[int]:
    """Where the rendering of ``content`` that starts at ``start`` ends: the content as
    given (or stripped, as templates often strip it) when the next skeleton piece
    follows it, else the next occurrence of that piece (a rewritten content)."""
    if last:
        end = len(text) - len(after)
        return end if end >= start and text.endswith(after) else None
    for variant in (content, content.strip(), content.lstrip(), content.rstrip()):
        if text.startswith(variant, start) and text.startswith(after, start + len(variant)):
            return start + len(variant)
    if not after:
        return None  # two contents side by side: where one ends is ambiguous
    found = text.find(after, start)
    return None if found < 0 else found


def character_roles(rendering: Rendering, roles: Sequence[int], assistant: int, user: int,
                    special_tokens: Sequence[str]) -> np.ndarray:
    """A role id per character of ``rendering.text`` (module doc for the rule).

    ``roles`` are the messages' role ids; ``special_tokens`` the strings that end a
    turn when they directly follow its content (the tokenizer's special tokens).
    """
    text = rendering.text
    out = np.empty(len(text), dtype=np.uint8)
    placed = sorted((span, index) for index, span in enumerate(rendering.spans) if span)
    previous, cursor = user, 0  # previous: the role of the last non-assistant message
    for slot, ((start, end), index) in enumerate(placed):
        role = roles[index]
        out[cursor:start] = role if role != assistant else previous
        limit = placed[slot + 1][0][0] if slot + 1 < len(placed) else len(text)
        end = min(_turn_end(text, end, special_tokens), limit)
        out[start:end] = role
        cursor = end
        if role != assistant:
            previous = role
    out[cursor:] = previous
    return out


def _turn_end(text: str, end: int, special_tokens: Sequence[str]) -> int:
    """``end`` moved past an end-of-turn token that follows the content (whitespace
    before it allowed) and the whitespace after that token."""
    probe = end
    while probe < len(text) and text[probe].isspace():
        probe += 1
    token = next((t for t in special_tokens if t and text.startswith(t, probe)), None)
    if token is None:
        return end
    probe += len(token)
    while probe < len(text) and text[probe].isspace():
        probe += 1
    return probe


def token_roles(char_roles: np.ndarray, offsets: np.ndarray, assistant: int) -> np.ndarray:
    """A role per token from the roles of its characters.

    A token is the assistant's if *any* of its characters is (a token that
    straddles the boundary of an answer is a target: the model must produce
    it to produce the answer); otherwise it takes the role of its first
    character. ``offsets`` are the tokens' ``[start, end)`` character offsets;
    characters that no token covers (offsets trimmed of spaces) belong to the
    token after them.
    """
    count = len(offsets)
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    starts = offsets[:, 0].astype(np.int64)
    ends = offsets[:, 1].astype(np.int64)
    previous_ends = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])
    starts = np.minimum(starts, previous_ends)
    is_assistant = np.concatenate([[0], np.cumsum(char_roles == assistant)])
    covered = is_assistant[ends] - is_assistant[starts] > 0
    first = char_roles[np.minimum(starts, len(char_roles) - 1)]
    return np.where(covered, assistant, first).astype(np.uint8)
