"""Chat formats: a conversation becomes role-tagged text segments.

Why: the format decides both the text the model sees and which tokens are
targets. Each format returns ``[(text, role_id), ...]``; the tokenizer then
encodes every segment separately, so a token never straddles two roles and a
prompt tokenizes exactly as it will at inference time. Special tokens in a
segment (``<|im_start|>``, ``</s>`` ...) take that segment's role.

Formats: ``chatml``, ``megatron-llm`` (token-for-token Megatron-LLM's
``preprocess_instruct_data.py``), ``llama3``, ``alpaca``, ``hf`` (the
tokenizer's own Jinja chat template, see :mod:`megatron_ext.data.hf_chat`)
and ``template`` (``--prompt_template`` with ``{system}``/``{input}``/``{output}``).

The one exception to "segments are encoded separately": ``hf`` is tokenized as one
text, as ``apply_chat_template`` tokenizes it; its segments only say which
characters have which role, and its ``encode`` gives each token a role from its
character offsets.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np

from megatron_ext.data import hf_chat
from megatron_ext.data.records import (
    ASSISTANT,
    ROLE_IDS,
    SYSTEM,
    USER,
    Conversation,
    Message,
    RecordError,
)
from megatron_ext.errors import ConfigError, TokenizerError
from megatron_ext.tokenizers import HFTokenizer, InstructTokenizer

Segments = list[tuple[str, int]]
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int32, roles uint8, lengths


class ChatFormat:
    """Base class: subclasses set ``name`` and implement :meth:`render`."""

    name = ""
    description = ""
    required_tokens: tuple[str, ...] = ()
    #: tokenize every plain piece with SentencePiece's dummy prefix (Megatron-LLM)
    megatron_llm = False
    #: an empty system prompt is rendered rather than left out
    keep_empty_system = False

    def __init__(self, tokenizer: InstructTokenizer):
        self.tokenizer = tokenizer

    def check(self) -> None:
        """Refuse a tokenizer that lacks this format's special tokens."""
        missing = [t for t in self.required_tokens if t not in self.tokenizer.special_tokens]
        if missing:
            raise TokenizerError(
                f"chat format {self.name!r} needs the special tokens {', '.join(missing)}, which "
                f"the tokenizer {self.tokenizer.source_file} does not have: add "
                f"--vocab_extra_ids_list \"{','.join(self.required_tokens)}\""
            )

    def render(self, conversation: Conversation) -> Segments:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, records: Sequence[Segments]) -> Encoded:
        """Tokens (int32), a role per token (uint8) and each record's length, for records
        given as :meth:`render` segments: what preprocessing writes.

        Every segment is encoded on its own and all its tokens take its role; the
        document start (SentencePiece's dummy prefix) is each record's first segment.
        """
        texts: list[str] = []
        starts: list[bool] = []
        segment_roles: list[int] = []
        segments_per_record: list[int] = []
        for segments in records:
            for index, (text, role) in enumerate(segments):
                texts.append(text)
                starts.append(index == 0)
                segment_roles.append(role)
            segments_per_record.append(len(segments))
        tokens, segment_lengths = self.tokenizer.encode_flat(texts, starts, self.megatron_llm)
        roles = np.repeat(np.array(segment_roles, dtype=np.uint8), segment_lengths)
        ends = np.cumsum(np.concatenate([[0], segment_lengths]))
        record_ends = ends[np.cumsum(segments_per_record, dtype=np.int64)]
        lengths = np.diff(np.concatenate([[0], record_ends])).astype(np.int32)
        return tokens, roles, lengths

    @property
    def stop_token(self) -> Optional[str]:
        """The token that ends an assistant turn (generation stops there)."""
        return self.tokenizer.eos_token

    def generation_prompt(self, conversation: Conversation) -> str:
        """Text of ``conversation`` followed by the opening of an assistant turn."""
        return "".join(text for text, _ in self.generation_prompt_segments(conversation))

    def generation_prompt_segments(self, conversation: Conversation) -> Segments:
        """:meth:`generation_prompt` as (text, role) segments, split exactly as
        :meth:`render` splits them, so that a model sees the prompt tokenized as
        preprocessing tokenized its training data."""
        segments = []
        for text, role in self.render(conversation + (_probe_message(),)):
            if _PROBE in text:
                head = text[: text.index(_PROBE)]
                if head:
                    segments.append((head, role))
                return segments
            segments.append((text, role))
        raise AssertionError(f"chat format {self.name} dropped the assistant turn")

    def hf_chat_template(self) -> str:
        """A Jinja chat template (``apply_chat_template``) that renders this format's text.

        Given a ``messages`` list of ``{"role", "content"}`` it renders the same
        text as :meth:`render`, and with ``add_generation_prompt`` the text of
        :meth:`generation_prompt`. Whether the *ids* match too depends on the
        tokenizer: :func:`megatron_ext.checkpointing.hf_tokenizer.chat_template` checks it.
        """
        raise TokenizerError(f"chat format {self.name!r} has no Hugging Face chat template")

    def template_variables(self) -> dict:
        """Variables :meth:`hf_chat_template` is rendered with besides the messages."""
        return {}

    def meta(self) -> dict:
        """What ``-meta.json`` records about the format beside its name (none by default)."""
        return {}


_PROBE = "\x00probe\x00"


def _probe_message():
    return Message(ASSISTANT, _PROBE)


class ChatML(ChatFormat):
    name = "chatml"
    description = "<|im_start|>{role}\\n{text}<|im_end|>\\n with roles system/user/assistant"
    required_tokens = ("<|im_start|>", "<|im_end|>")
    role_names = {SYSTEM: "system", USER: "user", ASSISTANT: "assistant"}

    def render(self, conversation):
        return [
            (f"<|im_start|>{self.role_names[m.role]}\n{m.content}<|im_end|>\n", ROLE_IDS[m.role])
            for m in conversation
        ]

    @property
    def stop_token(self):
        return "<|im_end|>"

    def hf_chat_template(self):
        return "".join((
            _jinja_role_table(self.role_names),
            "{%- for message in messages %}\n",
            _JINJA_CHECK_MESSAGE.format(name=jinja_literal(self.name)),
            "    {{- ", jinja_literal("<|im_start|>"), " ~ roles[message['role']] ~ ",
            jinja_literal("\n"), " ~ message['content'] ~ ", jinja_literal("<|im_end|>\n"), " }}\n",
            "{%- endfor %}\n",
            "{%- if add_generation_prompt %}\n",
            "    {{- ", jinja_literal(f"<|im_start|>{self.role_names[ASSISTANT]}\n"), " }}\n",
            "{%- endif %}\n",
        ))


class MegatronLLM(ChatML):
    name = "megatron-llm"
    description = ("Megatron-LLM's exact text and tokenization: ChatML with roles "
                   "system/question/answer, each message tokenized on its own")
    role_names = {SYSTEM: "system", USER: "question", ASSISTANT: "answer"}
    megatron_llm = True
    keep_empty_system = True


class Llama3(ChatFormat):
    name = "llama3"
    description = ("<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{text}"
                   "<|eot_id|> (Meta's Llama 3 template; texts are stripped as it does)")
    required_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>")

    def render(self, conversation):
        segments = [
            (f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>",
             ROLE_IDS[m.role])
            for m in conversation
        ]
        text, role = segments[0]
        segments[0] = ("<|begin_of_text|>" + text, role)
        return segments

    @property
    def stop_token(self):
        return "<|eot_id|>"

    def hf_chat_template(self):
        roles = {role: role for role in (SYSTEM, USER, ASSISTANT)}
        return "".join((
            _jinja_role_table(roles),
            "{%- for message in messages %}\n",
            _JINJA_CHECK_MESSAGE.format(name=jinja_literal(self.name)),
            "    {%- if loop.first %}{{- ", jinja_literal("<|begin_of_text|>"), " }}{%- endif %}\n",
            "    {{- ", jinja_literal("<|start_header_id|>"), " ~ message['role'] ~ ",
            jinja_literal("<|end_header_id|>\n\n"), " ~ (message['content'] | trim) ~ ",
            jinja_literal("<|eot_id|>"), " }}\n",
            "{%- endfor %}\n",
            "{%- if add_generation_prompt %}\n",
            "    {{- ", jinja_literal(f"<|start_header_id|>{ASSISTANT}<|end_header_id|>\n\n"), " }}\n",
            "{%- endif %}\n",
        ))


class Alpaca(ChatFormat):
    name = "alpaca"
    description = ("Stanford Alpaca: preamble (or the system prompt), ### Instruction:, "
                   "### Response:, answer + EOS")
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")

    def check(self):
        if self.tokenizer.eos_token is None:
            raise TokenizerError(
                f"chat format 'alpaca' ends answers with EOS, but the tokenizer "
                f"{self.tokenizer.source_file} has no EOS token; use --chat_format chatml"
            )

    def render(self, conversation):
        bos = self.tokenizer.bos_token or ""
        eos = self.tokenizer.eos_token
        segments: Segments = []
        if conversation[0].role != SYSTEM:
            segments.append((f"{bos}{self.preamble}\n\n", ROLE_IDS[SYSTEM]))
            bos = ""
        for index, message in enumerate(conversation):
            if message.role == SYSTEM:
                segments.append((f"{bos}{message.content}\n\n", ROLE_IDS[SYSTEM]))
            elif message.role == USER:
                lead = "\n\n" if index and conversation[index - 1].role == ASSISTANT else ""
                segments.append((f"{lead}### Instruction:\n{message.content}\n\n### Response:\n",
                                 ROLE_IDS[USER]))
            else:
                segments.append((f"{message.content}{eos}", ROLE_IDS[ASSISTANT]))
            bos = ""
        return segments

    def hf_chat_template(self):
        self.check()
        bos = jinja_literal(self.tokenizer.bos_token or "")
        roles = {role: role for role in (SYSTEM, USER, ASSISTANT)}
        return "".join((
            _jinja_role_table(roles),
            "{%- set ns = namespace(bos=", bos, ") %}\n",
            "{%- if messages[0]['role'] != ", jinja_literal(SYSTEM), " %}\n",
            "    {{- ns.bos ~ ", jinja_literal(f"{self.preamble}\n\n"), " }}\n",
            "    {%- set ns.bos = '' %}\n",
            "{%- endif %}\n",
            "{%- for message in messages %}\n",
            _JINJA_CHECK_MESSAGE.format(name=jinja_literal(self.name)),
            "    {%- if message['role'] == ", jinja_literal(SYSTEM), " %}\n",
            "        {{- ns.bos ~ message['content'] ~ ", jinja_literal("\n\n"), " }}\n",
            "    {%- elif message['role'] == ", jinja_literal(USER), " %}\n",
            "        {%- if not loop.first and loop.previtem['role'] == ", jinja_literal(ASSISTANT),
            " %}{{- ", jinja_literal("\n\n"), " }}{%- endif %}\n",
            "        {{- ", jinja_literal("### Instruction:\n"), " ~ message['content'] ~ ",
            jinja_literal("\n\n### Response:\n"), " }}\n",
            "    {%- else %}\n",
            "        {{- message['content'] ~ ", jinja_literal(self.tokenizer.eos_token), " }}\n",
            "    {%- endif %}\n",
            "    {%- set ns.bos = '' %}\n",
            "{%- endfor %}\n",
        ))


class Template(ChatFormat):
    """A single-turn user template, e.g. ``"{system}\\n\\nUser: {input}\\nAssistant: {output}"``.

    Text before ``{output}`` is the prompt (role user; the ``{system}`` value
    role system); ``{output}`` and everything after it are the target.
    """

    name = "template"
    description = "--prompt_template with {system}, {input} and {output} placeholders"
    _placeholder = re.compile(r"(\{system\}|\{input\}|\{output\})")

    def __init__(self, tokenizer, template: str):
        super().__init__(tokenizer)
        self.template = template
        parts = self._placeholder.split(template)
        names = parts[1::2]
        for required in ("{input}", "{output}"):
            if names.count(required) != 1:
                raise ConfigError(
                    f"--prompt_template must contain {required} exactly once, got {template!r}"
                )
        if names.count("{system}") > 1:
            raise ConfigError(f"--prompt_template may contain {{system}} once, got {template!r}")
        if names.index("{output}") != len(names) - 1:
            raise ConfigError("--prompt_template: {output} must come after {input} and {system}")
        self.has_system = "{system}" in names
        self._parts = parts

    def render(self, conversation):
        system = next((m.content for m in conversation if m.role == SYSTEM), None)
        turns = [m for m in conversation if m.role != SYSTEM]
        if len(turns) != 2 or turns[0].role != USER or turns[1].role != ASSISTANT:
            raise RecordError("template_single_turn",
                              "a --prompt_template renders one user turn and one answer; "
                              f"this record has {len(turns)} turns")
        if system is not None and not self.has_system:
            raise RecordError("template_no_system",
                              "record has a system prompt but --prompt_template has no {system}")
        values = {"{system}": (system or "", ROLE_IDS[SYSTEM]),
                  "{input}": (turns[0].content, ROLE_IDS[USER]),
                  "{output}": (turns[1].content, ROLE_IDS[ASSISTANT])}
        segments: Segments = []
        role = ROLE_IDS[USER]
        for index, part in enumerate(self._parts):
            if index % 2:
                text, part_role = values[part]
                if part == "{output}":
                    role = ROLE_IDS[ASSISTANT]
                _append(segments, text, part_role)
            else:
                _append(segments, part, role)
        return segments

    def hf_chat_template(self):
        name = jinja_literal(self.name)
        out = [
            "{%- set ns = namespace(system='', user=none, assistant=none, turns=0) %}\n",
            "{%- for message in messages %}\n",
            "    {%- if message['content'] is not string %}{{- raise_exception(", name,
            " ~ ': message content must be text') }}{%- endif %}\n",
            "    {%- if message['role'] == ", jinja_literal(SYSTEM), " %}\n",
            "        {%- if ns.system == '' %}{%- set ns.system = message['content'] %}{%- endif %}\n",
        ]
        if not self.has_system:
            out += ["        {{- raise_exception(", jinja_literal(
                "the prompt template has no {system}: a system message cannot be rendered"), ") }}\n"]
        out += [
            "    {%- elif message['role'] == ", jinja_literal(USER), " and ns.turns == 0 %}\n",
            "        {%- set ns.user = message['content'] %}{%- set ns.turns = 1 %}\n",
            "    {%- elif message['role'] == ", jinja_literal(ASSISTANT), " and ns.turns == 1 %}\n",
            "        {%- set ns.assistant = message['content'] %}{%- set ns.turns = 2 %}\n",
            "    {%- else %}\n",
            "        {{- raise_exception(", jinja_literal(
                "the prompt template renders one user message and one assistant answer "
                "(and an optional system message), in that order"), ") }}\n",
            "    {%- endif %}\n",
            "{%- endfor %}\n",
            "{%- if ns.turns == 0 or (add_generation_prompt and ns.turns == 2) %}\n",
            "    {{- raise_exception(", jinja_literal(
                "the prompt template needs a user message (and, without add_generation_prompt, "
                "may end with its answer)"), ") }}\n",
            "{%- endif %}\n",
        ]
        values = {"{system}": "ns.system", "{input}": "ns.user", "{output}": "ns.assistant"}
        for index, part in enumerate(self._parts):
            if part == "{output}":
                out.append("{%- if ns.turns == 2 %}\n")
            if index % 2:
                out += ["    {{- ", values[part], " }}\n"]
            elif part:
                out += ["    {{- ", jinja_literal(part), " }}\n"]
        out.append("{%- endif %}\n")
        return "".join(out)


def _append(segments: Segments, text: str, role: int) -> None:
    if not text:
        return
    if segments and segments[-1][1] == role:
        segments[-1] = (segments[-1][0] + text, role)
    else:
        segments.append((text, role))


def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja unescapes literals like Python)."""
    out = []
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char < " " or char == "\x7f":
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def _jinja_role_table(roles: dict[str, str]) -> str:
    items = ", ".join(f"{jinja_literal(k)}: {jinja_literal(v)}" for k, v in roles.items())
    return "{%- set roles = {" + items + "} %}\n"


# Refuse what the format cannot render, rather than render something else.
_JINJA_CHECK_MESSAGE = (
    "    {{%- if message['role'] not in roles or message['content'] is not string %}}\n"
    "        {{{{- raise_exception({name} ~ ': messages need a role among ' ~ (roles | list | join(', '))"
    " ~ ' and text content') }}}}\n"
    "    {{%- endif %}}\n"
)


class HFChatTemplate(ChatFormat):
    """The tokenizer's own Jinja ``chat_template`` (``--chat_format hf``).

    A record's text is the template's rendering of it, default system prompt
    included, tokenized as one text: its ids equal ``transformers``'
    ``apply_chat_template(messages, tokenize=True)``. The assistant's tokens are
    its answers plus their end-of-turn token (:mod:`megatron_ext.data.hf_chat`
    says how they are located and how a token on a boundary is assigned).
    """

    name = "hf"
    description = ("the tokenizer's own Jinja chat_template (tokenizer_config.json or "
                   "chat_template.jinja beside tokenizer.json), default system prompt included: "
                   "ids equal transformers' apply_chat_template")
    _probe = (Message(USER, "What is the capital of France?"),
              Message(ASSISTANT, "The capital of France is Paris."))

    def __init__(self, tokenizer: InstructTokenizer):
        super().__init__(tokenizer)
        alternatives = ", ".join(n for n in CHAT_FORMAT_NAMES if n != self.name)
        if not isinstance(tokenizer, HFTokenizer):
            raise ConfigError(
                f"--chat_format hf renders the chat template of a Hugging Face tokenizer, but "
                f"{tokenizer.source_file} is a {type(tokenizer).__name__}: pass the model's "
                f"tokenizer.json with --tokenizer_type HFTokenizer, or choose --chat_format "
                f"among {alternatives}")
        try:
            template, looked_at = hf_chat.find_chat_template(tokenizer.source_file)
        except hf_chat.ChatTemplateError as exc:
            raise ConfigError(f"--chat_format hf: {exc}") from None
        if template is None:
            raise ConfigError(
                f"--chat_format hf: the tokenizer {tokenizer.source_file} has no chat template "
                f"(no {' and no chat_template in '.join(looked_at)}): choose --chat_format "
                f"among {alternatives}")
        self.template = template
        self._alternatives = alternatives
        # special tokens that may end a turn, longest first (a prefix never shadows a token)
        self._special = sorted(tokenizer.special_tokens, key=len, reverse=True)
        try:
            hf_chat.compile_chat_template(template.text)
        except Exception as exc:  # noqa: BLE001 - jinja2's syntax errors, raised by the template
            raise ConfigError(f"--chat_format hf: the chat template in {template.source} does "
                              f"not parse ({exc})") from None
        self._stop_token = self._find_stop_token()

    def check(self) -> None:
        """Refuse a template whose assistant turns cannot be located (checked on probe
        conversations; records that still fail later are rejected one by one)."""
        probes = [self._probe,
                  (Message(SYSTEM, "You are a careful assistant."),) + self._probe,
                  self._probe + (Message(USER, "And of Italy?"), Message(ASSISTANT, "Rome."))]
        for index, probe in enumerate(probes):
            try:
                segments = self.render(probe)
            except RecordError as err:
                if index == 0 or err.code != "chat_template_refused":
                    raise ConfigError(
                        f"--chat_format hf: the chat template in {self.template.source} cannot be "
                        f"used for training: {err.message}; choose --chat_format among "
                        f"{self._alternatives}") from None
                continue  # e.g. a template that takes no system message: such records are rejected
            answers = [text for text, role in segments if role == ROLE_IDS[ASSISTANT]]
            if not any(m.content in "".join(answers) for m in probe if m.role == ASSISTANT):
                raise ConfigError(
                    f"--chat_format hf: the assistant turns of the chat template in "
                    f"{self.template.source} cannot be located; choose --chat_format among "
                    f"{self._alternatives}")

    def _messages(self, conversation: Conversation) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in conversation]

    def _locate(self, conversation: Conversation, add_generation_prompt: bool):
        import jinja2  # noqa: F401 - loaded with the template already; for the exception type

        try:
            return hf_chat.locate_messages(self.template, self._messages(conversation),
                                           add_generation_prompt)
        except jinja2.TemplateError as exc:
            raise RecordError("chat_template_refused",
                              f"the chat template refuses this conversation: {exc}") from None
        except hf_chat.ChatTemplateError as exc:
            raise RecordError("chat_template_unlocated",
                              f"{exc}: the assistant's tokens cannot be marked") from None

    def _segments(self, rendering: "hf_chat.Rendering", conversation: Conversation) -> Segments:
        chars = hf_chat.character_roles(rendering, [ROLE_IDS[m.role] for m in conversation],
                                        ROLE_IDS[ASSISTANT], ROLE_IDS[USER], self._special)
        segments: Segments = []
        if not len(chars):
            return segments
        bounds = np.flatnonzero(np.diff(chars)) + 1
        for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(chars)]])):
            segments.append((rendering.text[start:end], int(chars[start])))
        return segments

    def render(self, conversation):
        rendering = self._locate(conversation, False)
        missing = [n for n, (m, span) in enumerate(zip(conversation, rendering.spans), start=1)
                   if m.role == ASSISTANT and span is None]
        if missing:
            raise RecordError("chat_template_unlocated",
                              f"the chat template does not render assistant message {missing[0]}")
        return self._segments(rendering, conversation)

    def generation_prompt_segments(self, conversation):
        """The rendering with ``add_generation_prompt``: the ids of its one text are
        ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``."""
        try:
            return self._segments(self._locate(conversation, True), conversation)
        except RecordError as err:
            if err.code != "chat_template_unlocated":
                raise
        # where the messages are only matters to training; a prompt is its text
        text = self.template.render(self._messages(conversation), add_generation_prompt=True)
        return [(text, ROLE_IDS[USER])]

    def encode(self, records):
        texts = ["".join(text for text, _ in segments) for segments in records]
        token_parts, role_parts = [], []
        lengths = np.zeros(len(records), dtype=np.int32)
        encoded = self.tokenizer.encode_with_offsets(texts)
        for index, (segments, (ids, offsets)) in enumerate(zip(records, encoded)):
            chars = np.repeat(np.array([role for _, role in segments], dtype=np.uint8),
                              [len(text) for text, _ in segments])
            token_parts.append(np.asarray(ids, dtype=np.int32))
            role_parts.append(hf_chat.token_roles(chars, offsets, ROLE_IDS[ASSISTANT]))
            lengths[index] = len(ids)
        if not token_parts:
            return np.zeros(0, np.int32), np.zeros(0, np.uint8), lengths
        return np.concatenate(token_parts), np.concatenate(role_parts), lengths

    def _find_stop_token(self) -> Optional[str]:
        """The special token that follows an answer in the probe rendering (the
        end-of-turn token generation stops at), else the tokenizer's eos."""
        try:
            rendering = hf_chat.locate_messages(self.template, self._messages(self._probe))
        except Exception:  # noqa: BLE001 - check() reports an unusable template clearly
            return self.tokenizer.eos_token
        end = rendering.spans[-1][1] if rendering.spans[-1] else None
        if end is not None:
            rest = rendering.text[end:].lstrip()
            token = next((t for t in self._special if rest.startswith(t)), None)
            if token is not None:
                return token
        return self.tokenizer.eos_token

    @property
    def stop_token(self):
        return self._stop_token

    def hf_chat_template(self):
        """The tokenizer's own template, unchanged."""
        return self.template.text

    def template_variables(self) -> dict:
        """The named tokens the template is rendered with (``bos_token`` ...)."""
        return dict(self.template.variables)

    def meta(self) -> dict:
        """What ``-meta.json`` records beside the format's name: which template it was."""
        return {"chat_template_sha256": self.template.sha256,
                "chat_template_file": os.path.basename(self.template.source)}


FORMATS = {cls.name: cls for cls in (ChatML, MegatronLLM, Llama3, Alpaca, HFChatTemplate)}
CHAT_FORMAT_NAMES = tuple(FORMATS) + ("template",)


def unescape_template(template: str) -> str:
    r"""Shell-typed ``\n`` and ``\t`` in ``--prompt_template`` become real characters."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def build_chat_format(name: str, tokenizer: InstructTokenizer,
                      prompt_template: Optional[str] = None) -> ChatFormat:
    if prompt_template is not None:
        return Template(tokenizer, prompt_template)
    if name == "template":
        raise ConfigError("--chat_format template needs --prompt_template")
    if name not in FORMATS:
        raise ConfigError(f"unknown --chat_format {name!r}: choose one of {', '.join(CHAT_FORMAT_NAMES)}")
    return FORMATS[name](tokenizer)
