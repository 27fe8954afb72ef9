"""Export our tokenizer as a Hugging Face tokenizer directory.

Why: a model trained here is used with ``transformers`` (or vLLM, TGI ...)
through ``AutoTokenizer.from_pretrained(model_dir)``. That tokenizer must give
the ids the model was trained on: the same special-token ids (Megatron-LLM's
appended ``<CLS> <SEP> <EOD> <MASK>``, pad, bos, eos and the extra ids), the
same ids for text, and a chat template whose rendering tokenizes exactly as
the chat format did in preprocessing.

What is written (``export_hf_tokenizer``):

* ``tokenizer.json``: for a SentencePiece ``.model``, a ``tokenizers`` BPE
  pipeline equal to :class:`~megatron_ext.tokenizers.SentencePieceTokenizer`
  (built by :mod:`megatron_ext.tokenizers.conversion`: special tokens split
  first, the dummy-prefix space only at the start of the document, or before
  every piece for ``megatron-llm``, see below); for a Hugging Face tokenizer,
  its ``tokenizer.json`` with the added extra ids;
* ``tokenizer_config.json`` / ``special_tokens_map.json``: the named special
  tokens (``eos_token`` is the chat format's end-of-turn token) and the chat
  template, also as ``chat_template.jinja``; for SentencePiece the
  ``tokenizer.model`` too (GGUF converters read it).

Why here, beside :mod:`~megatron_ext.checkpointing.hf_export`: the chat
template and its verification need the chat formats (``megatron_ext.data``).

Nothing is written unless the result, loaded back with ``AutoTokenizer``,
passes :func:`verify_hf_tokenizer`; files are staged in a temporary
directory and moved into place one by one, and only tokenizer files are
touched in an existing directory (:data:`TOKENIZER_FILES` written,
:data:`STALE_FILES` of a previous tokenizer removed).

The one tokenization choice: ``megatron-llm`` data gives *every* piece of
plain text between special tokens SentencePiece's dummy-prefix space
(Megatron-LLM's ``tokenize``), so its export does the same, like
``transformers``' legacy Llama tokenizer; every other export adds it only at
the start of the text, like :meth:`InstructTokenizer.encode`.
:func:`reference_ids` says which ids the exported tokenizer gives for a text.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

from megatron_ext.data.chat_formats import FORMATS, ChatFormat, build_chat_format
from megatron_ext.data.hf_chat import render_chat_template
from megatron_ext.data.records import (
    ASSISTANT,
    SYSTEM,
    USER,
    Conversation,
    Message,
    RecordError,
)
from megatron_ext.errors import TokenizerError
from megatron_ext.io import json_text, publish, temporary_directory, write_text
from megatron_ext.tokenizers import (
    CHAT_TEMPLATE_FILE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    HFTokenizer,
    InstructTokenizer,
    SentencePieceTokenizer,
    read_tokenizer_config,
)
from megatron_ext.tokenizers.conversion import dummy_prefix_mode, hf_backend

#: files an export writes; nothing else in the output directory is touched, except ...
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE,
                   SENTENCEPIECE_FILE)
#: ... these tokenizer files, removed when the export does not write them: left from a
#: previous tokenizer, they would contradict the new one
STALE_FILES = (CHAT_TEMPLATE_FILE, SENTENCEPIECE_FILE, "added_tokens.json", "vocab.json",
               "merges.txt")


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def export_hf_tokenizer(tokenizer: InstructTokenizer, chat_format: str | None, out_dir: str,
                        template: str | None = None) -> dict:
    """Write ``tokenizer`` (and ``chat_format``'s chat template) as a Hugging Face tokenizer.

    ``chat_format`` is a name of :data:`~megatron_ext.data.chat_formats.CHAT_FORMAT_NAMES`
    (``template`` with ``template`` = the ``--prompt_template``) or None for no
    chat template. ``out_dir`` may already hold a model: only
    :data:`TOKENIZER_FILES` are written there. Raises :class:`TokenizerError`
    (nothing written) when the result would not reproduce our ids.
    Returns a summary: files, vocabulary size, named special tokens and ids,
    the generation-config eos ids and the dummy-prefix mode.
    """
    fmt = _build_format(chat_format, tokenizer, template)
    every_piece = _every_piece(tokenizer, fmt)
    template_text = _checked_template(fmt, tokenizer) if fmt is not None else None
    backend, unk_token = hf_backend(tokenizer, every_piece)
    named = _named_tokens(tokenizer, fmt, unk_token)
    files = {
        TOKENIZER_JSON: backend.to_str(pretty=True),
        TOKENIZER_CONFIG: json_text(_tokenizer_config(tokenizer, named, template_text, backend),
                                    ensure_ascii=False),
        SPECIAL_TOKENS_MAP: json_text(_special_tokens_map(tokenizer, named), ensure_ascii=False),
    }
    if template_text is not None:
        files[CHAT_TEMPLATE_FILE] = template_text
    copies = {SENTENCEPIECE_FILE: tokenizer.source_file} if isinstance(
        tokenizer, SentencePieceTokenizer) else {}

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TokenizerError(f"tokenizer export: {out_dir} exists and is not a directory")
    existing = os.path.isdir(out_dir)
    os.makedirs(out_dir if existing else os.path.dirname(out_dir), exist_ok=True)
    # beside the files it replaces (same file system: renames are atomic)
    near = os.path.join(out_dir, ".tokenizer-export") if existing else out_dir
    written = sorted(files) + sorted(copies)
    removed: list[str] = []
    with temporary_directory(near) as staging:
        for name, text in files.items():
            write_text(os.path.join(staging, name), text)
        for name, source in copies.items():
            shutil.copyfile(source, os.path.join(staging, name))
        # AutoTokenizer also reads the model's config.json: verify with it next to the files
        model_config = os.path.join(out_dir, "config.json")
        if os.path.isfile(model_config):
            shutil.copyfile(model_config, os.path.join(staging, "config.json"))
        hf = load_hf_tokenizer(staging)
        verify_hf_tokenizer(tokenizer, hf, fmt, template_text, every_piece=every_piece)
        if existing:
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            # files of the replaced tokenizer that would contradict the new one (a stale
            # chat_template.jinja overrides the config; GGUF converters read tokenizer.model)
            for name in STALE_FILES:
                path = os.path.join(out_dir, name)
                if name not in written and os.path.isfile(path):
                    os.remove(path)
                    removed.append(name)
        else:
            publish(staging, out_dir)

    return {
        "out_dir": out_dir,
        "files": written,
        "removed": removed,
        "vocab_size": tokenizer.vocab_size,
        "chat_format": fmt.name if fmt is not None else None,
        "chat_template": template_text is not None,
        "dummy_prefix": dummy_prefix_mode(tokenizer, every_piece),
        "special_tokens": {k: v for k, v in named.items() if v is not None},
        "special_token_ids": {k: hf.convert_tokens_to_ids(v) for k, v in named.items()
                              if v is not None},
        "generation_eos_ids": generation_config_eos(tokenizer, chat_format, template),
    }


def chat_template(format_name: str, tokenizer: InstructTokenizer,
                  template: str | None = None) -> str:
    """The Jinja chat template of ``format_name`` for ``tokenizer``, checked to be exact.

    Its rendering of a conversation, tokenized as one text (what
    ``apply_chat_template`` does), gives the ids preprocessing gives that
    conversation; with ``add_generation_prompt`` it renders the format's
    :meth:`~ChatFormat.generation_prompt`. Raises :class:`TokenizerError` for a
    format whose ids can't be reproduced that way with this tokenizer.
    """
    return _checked_template(_build_format(format_name, tokenizer, template), tokenizer)


def generation_config_eos(tokenizer: InstructTokenizer, chat_format: str | None,
                          template: str | None = None) -> list[int]:
    """The ``eos_token_id`` list of a generation config: the tokenizer's eos and the
    format's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), without repeats."""
    if chat_format == "template" and template is None:
        fmt = None  # a prompt template's answers end with the tokenizer's eos
    else:
        fmt = _build_format(chat_format, tokenizer, template)
    ids: list[int] = []
    for token in (tokenizer.eos_token, fmt.stop_token if fmt is not None else None):
        if token is not None and tokenizer.token_id(token) not in ids:
            ids.append(tokenizer.token_id(token))
    if not ids:
        raise TokenizerError(
            f"the tokenizer {tokenizer.source_file} has no eos token and the chat format "
            f"{chat_format!r} no end-of-turn token: generation would never stop"
        )
    return ids


def reference_ids(tokenizer: InstructTokenizer, text: str, chat_format: str | None = None) -> list[int]:
    """Our ids for ``text`` as a whole document: what the tokenizer exported for
    ``chat_format`` gives for ``encode(text, add_special_tokens=False)``."""
    return tokenizer.encode_segments([text], [True], _every_piece_name(tokenizer, chat_format))[0]


def format_ids(fmt: ChatFormat, conversation: Conversation) -> list[int]:
    """A conversation's ids as preprocessing writes them (segments encoded separately)."""
    return fmt.encode([fmt.render(conversation)])[0].tolist()


def load_hf_tokenizer(path: str):
    """``transformers.AutoTokenizer.from_pretrained(path)``, errors as :class:`TokenizerError`."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot"
        raise TokenizerError(f"transformers cannot load the tokenizer in {path}: {exc}") from None


def chat_template_ids(hf_tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                      template: str | None = None) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` as a plain id list (transformers 4 and 5)."""
    out = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(i) for i in out]


def verify_hf_tokenizer(tokenizer: InstructTokenizer, hf_tokenizer, fmt: ChatFormat | None = None,
                        template: str | None = None, texts: Sequence[str] | None = None,
                        every_piece: bool | None = None) -> None:
    """Raise :class:`TokenizerError` unless ``hf_tokenizer`` reproduces ``tokenizer``.

    Checked: vocabulary size; every special token's id (and that it encodes
    as that single id); bos/eos/pad ids; the ids and decoding of ``texts``
    (a built-in varied set by default); with ``template``, the chat ids of
    probe conversations of ``fmt`` with and without a generation prompt.
    """
    if every_piece is None:
        every_piece = _every_piece(tokenizer, fmt)
    problems: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            problems.append(f"{what}: Hugging Face gives {got!r}, ours is {want!r}")

    expect("vocabulary size (len(tokenizer))", len(hf_tokenizer), tokenizer.vocab_size)
    for token, index in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]):
        expect(f"id of special token {token!r}", hf_tokenizer.convert_tokens_to_ids(token), index)
        expect(f"ids of the text {token!r}",
               hf_tokenizer.encode(token, add_special_tokens=False), [index])
    if tokenizer.bos_id is not None:
        expect("bos_token_id", hf_tokenizer.bos_token_id, tokenizer.bos_id)
    if tokenizer.pad_id is not None:
        expect("pad_token_id", hf_tokenizer.pad_token_id, tokenizer.pad_id)
    stop = fmt.stop_token if fmt is not None else tokenizer.eos_token
    if stop is not None:
        expect("eos_token_id", hf_tokenizer.eos_token_id, tokenizer.token_id(stop))

    for text in (probe_texts(tokenizer) if texts is None else texts):
        want = tokenizer.encode_segments([text], [True], every_piece)[0]
        got = hf_tokenizer.encode(text, add_special_tokens=False)
        expect(f"ids of {text!r}", got, want)
        if hf_tokenizer.unk_token_id in want:
            continue  # unknown text has no decoding to agree on (SentencePiece prints " ⁇ ")
        expect(f"decoding of the ids of {text!r}",
               hf_tokenizer.decode(want, skip_special_tokens=False, clean_up_tokenization_spaces=False),
               tokenizer.decode(want, doc_start=True, megatron_llm=every_piece))

    if template is not None and fmt is not None:
        for conversation in probe_conversations(fmt):
            messages = [{"role": m.role, "content": m.content} for m in conversation]
            if _renders(fmt, conversation):
                expect(f"chat ids of {messages}",
                       chat_template_ids(hf_tokenizer, messages, template=template),
                       format_ids(fmt, conversation))
            if _prompts(fmt, conversation):
                expect(f"generation-prompt ids of {messages}",
                       chat_template_ids(hf_tokenizer, messages, True, template=template),
                       tokenizer.encode_segments([fmt.generation_prompt(conversation)], [True],
                                                 fmt.megatron_llm)[0])
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise TokenizerError(
            f"the Hugging Face export of {tokenizer.source_file} does not reproduce our "
            f"tokenizer, so it was not written:\n  {shown}{more}"
        )


def probe_texts(tokenizer: InstructTokenizer) -> list[str]:
    """Varied texts for checks: unicode, spaces, newlines, digits, and the special tokens."""
    texts = [
        "", " ", "  ", "\n", "Hello world", " Hello", "  two leading spaces", "trailing  ",
        "tabs\tand  double  spaces\nand\nnew lines\n\n", "\n\nleading newlines",
        "Grüße aus Köln! Ça va? ¿Qué tal?", "日本語のテキストと中文文本。", "Emoji 🤖🚀 and math ∑ x² ≤ ∞",
        "numbers 12345 3.14159 -7", "code: def f(x):\n    return x ** 2  # comment",
        "\u00a0no-break and zero\u200bwidth", "a\r\nwindows line",
    ]
    for token in sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get):
        texts += [token, f"{token}user\nHi there{token}\n", f"text {token} more  {token}  end",
                  f" {token}", f"{token}{token} x", f"x{token}\n\n{token}日本"]
    return texts


def probe_conversations(fmt: ChatFormat) -> list[Conversation]:
    """Conversations that ``fmt`` renders, with contents that start and end in varied ways
    (spaces, newlines, digits, punctuation, unicode) to probe the boundaries between parts."""
    starts = ["Hello", " hello", "\nnew line", "42 is", "### not a header", "日本語", "🤖 bot",
              "  two", "\ttab", "(paren"]
    ends = ["end.", "end ", "end\n", "end\n\n", "42", "日本", "!!", ")"]
    contents = [f"{start} middle text {ends[i % len(ends)]}" for i, start in enumerate(starts)]
    out: list[Conversation] = []
    for i in range(len(contents)):
        c = [contents[(i + k) % len(contents)] for k in range(5)]
        out.append((Message(USER, c[0]), Message(ASSISTANT, c[1])))
        out.append((Message(SYSTEM, c[2]), Message(USER, c[3]), Message(ASSISTANT, c[4])))
        out.append((Message(SYSTEM, c[4]), Message(USER, c[0]), Message(ASSISTANT, c[1]),
                    Message(USER, c[2]), Message(ASSISTANT, c[3])))
        out.append((Message(USER, c[1]),))
        out.append((Message(SYSTEM, c[3]), Message(USER, c[2])))
    out.append((Message(SYSTEM, ""), Message(USER, "Hi"), Message(ASSISTANT, "Hello!")))
    special = fmt.stop_token or next(iter(fmt.tokenizer.special_tokens), None)
    if special:
        out.append((Message(USER, f"say {special} please"), Message(ASSISTANT, f"{special} ok")))
    return [c for c in out if _renders(fmt, c) or _prompts(fmt, c)]


def _renders(fmt: ChatFormat, conversation: Conversation) -> bool:
    """Whether ``fmt`` renders ``conversation`` (a prompt template wants exactly one answer)."""
    try:
        fmt.render(conversation)
    except RecordError:
        return False
    return True


def _prompts(fmt: ChatFormat, conversation: Conversation) -> bool:
    """Whether ``conversation`` is a prompt that ``fmt`` can add a generation prompt to."""
    if conversation[-1].role != USER:
        return False
    try:
        fmt.generation_prompt(conversation)
    except RecordError:
        return False
    return True


# ---------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------
def _build_format(name: str | None, tokenizer: InstructTokenizer,
                  template: str | None) -> ChatFormat | None:
    if name is None and template is None:
        return None
    fmt = build_chat_format(name or "template", tokenizer, template)
    fmt.check()
    return fmt


def _checked_template(fmt: ChatFormat, tokenizer: InstructTokenizer) -> str:
    """``fmt``'s template, after checking on probe conversations that it is exact."""
    text = fmt.hf_chat_template()
    for conversation in probe_conversations(fmt):
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        if _prompts(fmt, conversation):
            prompt = render_chat_template(text, messages, add_generation_prompt=True,
                                          **fmt.template_variables())
            if prompt != fmt.generation_prompt(conversation):
                raise TokenizerError(f"internal error: the {fmt.name} chat template's generation "
                                     f"prompt is {prompt!r}, the format's "
                                     f"{fmt.generation_prompt(conversation)!r}")
        if not _renders(fmt, conversation):
            continue
        segments = fmt.render(conversation)
        rendered = render_chat_template(text, messages, **fmt.template_variables())
        expected_text = "".join(part for part, _ in segments)
        if rendered != expected_text:  # a bug in the template, not in the tokenizer
            raise TokenizerError(f"internal error: the {fmt.name} chat template renders "
                                 f"{rendered!r} where the format renders {expected_text!r}")
        want = format_ids(fmt, conversation)
        got = tokenizer.encode_segments([rendered], [True], fmt.megatron_llm)[0]
        if got != want:
            raise TokenizerError(_boundary_message(fmt, tokenizer, got, want))
    return text


def _boundary_message(fmt: ChatFormat, tokenizer: InstructTokenizer, got, want) -> str:
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    context = tokenizer.decode(want[max(0, first - 3):first + 3])
    return (
        f"chat format {fmt.name!r} cannot be exported as an exact chat template for the tokenizer "
        f"{tokenizer.source_file}: preprocessing tokenizes each part of a conversation (system, "
        f"user, assistant) on its own, but a chat template is tokenized as one text, and this "
        f"tokenizer joins or splits text differently across a boundary between parts "
        f"(near {context!r}: token {first} is {got[first:first + 1]} instead of "
        f"{want[first:first + 1]}). Use a format whose parts are separated by special tokens "
        f"(chatml, llama3), or export without a chat template (chat_format None)"
    )


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
def _every_piece(tokenizer: InstructTokenizer, fmt: ChatFormat | None) -> bool:
    return isinstance(tokenizer, SentencePieceTokenizer) and fmt is not None and fmt.megatron_llm


def _every_piece_name(tokenizer: InstructTokenizer, chat_format: str | None) -> bool:
    cls = FORMATS.get(chat_format) if chat_format else None
    return isinstance(tokenizer, SentencePieceTokenizer) and bool(cls and cls.megatron_llm)



# ---------------------------------------------------------------------------
# configuration files
# ---------------------------------------------------------------------------
def _named_tokens(tokenizer: InstructTokenizer, fmt: ChatFormat | None,
                  unk: str | None) -> dict[str, str | None]:
    by_id = {index: token for token, index in tokenizer.special_tokens.items()}
    stop = fmt.stop_token if fmt is not None else None
    return {
        "bos_token": tokenizer.bos_token,
        "eos_token": stop or tokenizer.eos_token,
        "pad_token": by_id.get(tokenizer.pad_id) if tokenizer.pad_id is not None else None,
        "unk_token": unk,
    }


def _extra_specials(tokenizer: InstructTokenizer, named: dict) -> list[str]:
    taken = {v for v in named.values() if v is not None}
    return [t for t in sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
            if t not in taken]


def _tokenizer_config(tokenizer: InstructTokenizer, named: dict, template: str | None,
                      backend) -> dict:
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if isinstance(tokenizer, HFTokenizer):
        settings = read_tokenizer_config(os.path.dirname(tokenizer.source_file))
        for key in ("model_max_length", "padding_side", "truncation_side",
                    "model_input_names", "add_bos_token", "add_eos_token"):
            if key in settings:
                config[key] = settings[key]
    else:
        config.update(add_bos_token=False, add_eos_token=False)
    config["clean_up_tokenization_spaces"] = False
    config.update({k: v for k, v in named.items() if v is not None})
    config["additional_special_tokens"] = _extra_specials(tokenizer, named)
    config["added_tokens_decoder"] = {
        str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                     "rstrip": token.rstrip, "single_word": token.single_word,
                     "special": token.special}
        for index, token in sorted(backend.get_added_tokens_decoder().items())
    }
    if template is not None:
        config["chat_template"] = template
    return config


def _special_tokens_map(tokenizer: InstructTokenizer, named: dict) -> dict:
    out: dict = {k: v for k, v in named.items() if v is not None}
    out["additional_special_tokens"] = _extra_specials(tokenizer, named)
    return out

