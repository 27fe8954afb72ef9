"""Exporting our tokenizers as Hugging Face tokenizer directories (CPU, no downloads).

Every export is loaded back with ``transformers.AutoTokenizer`` and compared
with our tokenizer: special-token ids, text ids, decoding, and chat
templates against the chat formats' own rendering and tokenization.
"""

from __future__ import annotations

import copy
import json
import os

import pytest

from megatron_ext.checkpointing import hf_tokenizer as te
from megatron_ext.data.chat_formats import build_chat_format, jinja_literal
from megatron_ext.data.records import ASSISTANT, SYSTEM, USER, Message
from megatron_ext.errors import TokenizerError
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
from tests.conftest import CHATML, LLAMA3

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\nstarts with a newline\n\nand has blank lines\n",
    "tabs\tand  double  spaces",
    "Grüße aus Köln! Ça va? ¿Qué tal?",
    "日本語のテキストと中文文本。",
    "Emoji 🤖🚀 and math ∑ x² ≤ ∞",
    "digits 0123456789 and 3.14",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "text <|im_end|> in the middle <|eot_id|>and glued<|begin_of_text|>",
    " <|im_start|> spaces around specials <|im_end|> ",
    "<s>bos and eos</s> inside text",
    "",
]

CONVERSATIONS = [
    (Message(USER, "What is the capital of France?"), Message(ASSISTANT, "Paris.")),
    (Message(SYSTEM, "You are a helpful assistant."), Message(USER, " Grüße 🤖\nzwei Zeilen"),
     Message(ASSISTANT, "Hallo!\n\nWie geht's?")),
    (Message(SYSTEM, "Be brief."), Message(USER, "1+1?"), Message(ASSISTANT, "2"),
     Message(USER, "日本語で?"), Message(ASSISTANT, "二です。 ")),
    (Message(USER, "Say <|im_end|> literally"), Message(ASSISTANT, "  <|im_end|> said")),
]
PROMPTS = [
    (Message(USER, "Hi there"),),
    (Message(SYSTEM, "You are terse."), Message(USER, "Count to 3")),
    (Message(USER, "a"), Message(ASSISTANT, "b"), Message(USER, " c\n")),
]
FORMATS = ("chatml", "megatron-llm", "llama3", "alpaca")


@pytest.fixture(scope="module")
def tokenizers(sp_model, hf_tokenizer_dir):
    extra = CHATML + LLAMA3
    return {
        "sentencepiece": build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, extra)),
        "byte-level": build_tokenizer(TokenizerConfig("HFTokenizer", hf_tokenizer_dir, extra)),
    }


@pytest.fixture(scope="module")
def exported(tokenizers, tmp_path_factory):
    """(kind, chat_format) -> (our tokenizer, loaded HF tokenizer, summary); exports once."""
    cache: dict = {}

    def get(kind: str, chat_format):
        key = (kind, chat_format)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "tokenizer"
            tok = tokenizers[kind]
            summary = te.export_hf_tokenizer(tok, chat_format, str(out))
            cache[key] = (tok, transformers.AutoTokenizer.from_pretrained(str(out)), summary)
        return cache[key]

    return get


def _messages(conversation):
    return [{"role": m.role, "content": m.content} for m in conversation]


def _format_ids(fmt, conversation):
    """Preprocessing's ids: each segment encoded on its own, the first as document start."""
    segments = fmt.render(conversation)
    encoded = fmt.tokenizer.encode_segments([t for t, _ in segments],
                                            [i == 0 for i in range(len(segments))],
                                            fmt.megatron_llm)
    return [token for ids in encoded for token in ids]


def _chat_ids(hf, messages, add_generation_prompt=False):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return list(out)


# -- special tokens and text ------------------------------------------------------
@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_special_token_ids_and_vocab_size(exported, kind):
    tok, hf, summary = exported(kind, "chatml")
    assert len(hf) == tok.vocab_size == summary["vocab_size"]
    for token, index in tok.special_tokens.items():
        assert hf.convert_tokens_to_ids(token) == index, token
        assert hf.encode(token, add_special_tokens=False) == [index], token
        assert hf.convert_ids_to_tokens(index) == token
    for extra in CHATML + LLAMA3:
        assert extra in hf.all_special_tokens
    assert hf.bos_token_id == tok.bos_id
    assert hf.eos_token == "<|im_end|>"  # the chat format's end of turn
    assert hf.eos_token_id == tok.token_id("<|im_end|>")
    assert hf.pad_token_id == tok.pad_id
    if kind == "sentencepiece":
        assert tok.pad_id is not None and hf.pad_token == "<PAD>"
        # Megatron-LLM's appended layout: SentencePiece pieces, then the new specials
        assert [tok.special_tokens[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")] == \
            list(range(tok._base_size, tok._base_size + 5))
        assert hf.unk_token == "<unk>" and hf.unk_token_id == tok._sp.unk_id()
    assert summary["special_token_ids"]["eos_token"] == hf.eos_token_id


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_text_ids_and_decoding_equal(exported, kind):
    tok, hf, _ = exported(kind, None)
    assert hf.eos_token == tok.eos_token  # no chat format: the tokenizer's own eos
    for text in TEXTS + [t * 3 for t in TEXTS[:6]]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == text
    assert hf.encode("Hello world") == tok.encode("Hello world")  # nothing added by default


def test_sentencepiece_dummy_prefix_only_at_document_start(exported):
    tok, hf, _ = exported("sentencepiece", "chatml")
    text = "<|im_start|>user\nhello<|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.tokenize(" x")[:2] == ["\u2581", "\u2581x"]  # both spaces kept, like SentencePiece
    assert not hf.tokenize("<|im_start|>user")[1].startswith("\u2581")  # no prefix after a special


def test_megatron_llm_export_prefixes_every_piece_and_shares_chatml_ids(exported):
    tok, hf, summary = exported("sentencepiece", "megatron-llm")
    _, chatml_hf, _ = exported("sentencepiece", "chatml")
    assert summary["dummy_prefix"] == "before every piece between special tokens"
    for token in CHATML:
        assert hf.convert_tokens_to_ids(token) == chatml_hf.convert_tokens_to_ids(token) \
            == tok.token_id(token)
    text = "<|im_start|>question\nWhat?<|im_end|>\n<|im_start|>answer\nThis.<|im_end|>\n"
    megatron_ids = tok.encode_segments([text], [True], megatron_llm=True)[0]
    assert megatron_ids != tok.encode(text)  # the two modes differ here ...
    assert hf.encode(text, add_special_tokens=False) == megatron_ids  # ... and the export is Megatron-LLM's
    assert te.reference_ids(tok, text, "megatron-llm") == megatron_ids
    assert hf.decode(megatron_ids) == text
    for plain in TEXTS[:10]:  # without special tokens both modes agree
        assert hf.encode(plain, add_special_tokens=False) == tok.encode(plain)


# -- chat templates --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
@pytest.mark.parametrize("name", FORMATS)
def test_chat_template_ids_equal_chat_format(exported, tokenizers, kind, name):
    tok = tokenizers[kind]
    if kind == "byte-level" and name == "alpaca":
        # alpaca's parts are tokenized apart, and GPT-2's split regex joins "\n" with the
        # answer's leading spaces across that boundary: no exact template exists
        with pytest.raises(TokenizerError, match="alpaca.*cannot be exported as an exact"):
            te.chat_template(name, tok)
        return
    tok, hf, summary = exported(kind, name)
    fmt = build_chat_format(name, tok)
    assert summary["chat_template"] and hf.chat_template == te.chat_template(name, tok)
    for conversation in CONVERSATIONS:
        messages = _messages(conversation)
        rendered = hf.apply_chat_template(messages, tokenize=False)
        assert rendered == "".join(text for text, _ in fmt.render(conversation))
        assert _chat_ids(hf, messages) == _format_ids(fmt, conversation), (name, messages)
    for conversation in PROMPTS:
        prompt = fmt.generation_prompt(conversation)
        want = tok.encode_segments([prompt], [True], fmt.megatron_llm)[0]
        assert hf.apply_chat_template(_messages(conversation), tokenize=False,
                                      add_generation_prompt=True) == prompt
        assert _chat_ids(hf, _messages(conversation), add_generation_prompt=True) == want
    stop = hf.eos_token_id
    assert stop == tok.token_id(fmt.stop_token)
    if name != "alpaca":  # every assistant turn ends with the end-of-turn token
        ids = _chat_ids(hf, _messages(CONVERSATIONS[0]))
        assert ids.count(stop) == len(CONVERSATIONS[0])


def test_llama3_template_needs_its_tokens(sp_model):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML))
    with pytest.raises(TokenizerError, match="<\\|begin_of_text\\|>"):
        te.chat_template("llama3", tok)


def test_template_refuses_roles_the_format_cannot_render(exported):
    _, hf, _ = exported("sentencepiece", "chatml")
    with pytest.raises(Exception, match="messages need a role"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_prompt_template_format(tokenizers, tmp_path):
    tok = tokenizers["sentencepiece"]
    exact = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n{output}<|im_end|>\n"
    text = te.chat_template("template", tok, exact)
    fmt = build_chat_format("template", tok, exact)
    conversation = (Message(USER, "Hi"), Message(ASSISTANT, "Hello"))
    assert te.render_chat_template(text, _messages(conversation)) == \
        "".join(t for t, _ in fmt.render(conversation))
    assert te.render_chat_template(text, _messages(conversation[:1]), True) == \
        fmt.generation_prompt(conversation[:1])
    te.export_hf_tokenizer(tok, "template", str(tmp_path / "out"), template=exact)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert _chat_ids(hf, _messages(conversation)) == _format_ids(fmt, conversation)
    assert _chat_ids(hf, _messages(conversation[:1]), add_generation_prompt=True) == \
        tok.encode(fmt.generation_prompt(conversation[:1]))
    assert hf.eos_token == tok.eos_token  # a prompt template's answers end with eos
    with pytest.raises(Exception, match="one user message and one assistant answer"):
        hf.apply_chat_template(_messages(conversation * 2), tokenize=False)
    # a space before {output} is tokenized with the answer in one text, apart in the data
    with pytest.raises(TokenizerError, match="cannot be exported as an exact chat template"):
        te.chat_template("template", tok, "User: {input}\nAssistant: {output}")


def test_generation_config_eos(tokenizers):
    tok = tokenizers["sentencepiece"]
    eos = tok.eos_id
    assert te.generation_config_eos(tok, "chatml") == [eos, tok.token_id("<|im_end|>")]
    assert te.generation_config_eos(tok, "megatron-llm") == [eos, tok.token_id("<|im_end|>")]
    assert te.generation_config_eos(tok, "llama3") == [eos, tok.token_id("<|eot_id|>")]
    assert te.generation_config_eos(tok, "alpaca") == [eos]
    assert te.generation_config_eos(tok, None) == [eos]
    hf_tok = tokenizers["byte-level"]
    assert te.generation_config_eos(hf_tok, "chatml") == [hf_tok.token_id("<|end_of_text|>"),
                                                         hf_tok.token_id("<|im_end|>")]


def test_jinja_literal_round_trips():
    text = "quote ' backslash \\ newline \n tab \t nul \x00 ümlaut 日本 🤖 {{ x }} {% y %}"
    assert te.render_chat_template("{{- " + jinja_literal(text) + " }}", []) == text


# -- files and errors --------------------------------------------------------------------
def test_export_into_a_model_directory_writes_only_tokenizer_files(tokenizers, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 2048}
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "chat_template.jinja").write_text("stale")
    summary = te.export_hf_tokenizer(tokenizers["sentencepiece"], None, str(out))
    assert set(summary["files"]) == {"tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json", "tokenizer.model"}
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *summary["files"]])
    assert json.loads((out / "config.json").read_text()) == config
    assert (out / "model.safetensors").read_bytes() == b"weights"
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.chat_template is None  # the stale template went with the old tokenizer
    assert hf.encode(TEXTS[2], add_special_tokens=False) == tokenizers["sentencepiece"].encode(TEXTS[2])

    summary = te.export_hf_tokenizer(tokenizers["byte-level"], "llama3", str(out))  # replaces it
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert summary["removed"] == ["tokenizer.model"]  # it would describe the old tokenizer
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *summary["files"]])
    assert "chat_template.jinja" in summary["files"]
    assert hf.encode(TEXTS[7], add_special_tokens=False) == tokenizers["byte-level"].encode(TEXTS[7])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tokenizer-export")]


def test_shifted_special_ids_are_refused(tokenizers, tmp_path):
    tok = copy.copy(tokenizers["sentencepiece"])
    # a layout with a gap (e.g. reserved ids): appended tokens cannot land there
    tok.special_tokens = dict(tok.special_tokens, **{"<|im_end|>": tok.vocab_size + 3})
    tok.vocab_size += 4
    out = tmp_path / "out"
    with pytest.raises(TokenizerError, match=f"<\\|im_end\\|>.*ours {tok.vocab_size - 1}"):
        te.export_hf_tokenizer(tok, "chatml", str(out))
    assert not out.exists() and not os.listdir(tmp_path)


def test_verification_reports_mismatches(exported, tokenizers):
    _, other_hf, _ = exported("byte-level", None)
    with pytest.raises(TokenizerError, match="does not reproduce") as error:
        te.verify_hf_tokenizer(tokenizers["sentencepiece"], other_hf)
    assert "id of special token '<CLS>'" in str(error.value)


def _train_sp(tmp_path, name, **options):
    import sentencepiece as spm

    settings = {"model_type": "bpe", "byte_fallback": True, "normalization_rule_name": "identity",
                "remove_extra_whitespaces": False, "vocab_size": 500, "hard_vocab_limit": False,
                "minloglevel": 2}
    settings.update(options)
    lines = [line for text in TEXTS for line in text.splitlines() if line.strip()] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(tmp_path / name), **settings)
    return str(tmp_path / name) + ".model"


def test_unsupported_sentencepiece_model_is_refused(tmp_path):
    model = _train_sp(tmp_path, "unigram", model_type="unigram", normalization_rule_name="nmt_nfkc",
                      remove_extra_whitespaces=True)
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", model, CHATML))
    with pytest.raises(TokenizerError, match="not a BPE model.*removes extra whitespace.*nmt_nfkc"):
        te.export_hf_tokenizer(tok, "chatml", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_user_defined_symbols_must_be_special_tokens(tmp_path):
    model = _train_sp(tmp_path, "userdef", user_defined_symbols=[*CHATML, "<tool>"])
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", model, CHATML))
    with pytest.raises(TokenizerError, match="user-defined symbols.*'<tool>'"):
        te.export_hf_tokenizer(tok, "chatml", str(tmp_path / "refused"))
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", model, (*CHATML, "<tool>")))
    assert tok.special_tokens["<tool>"] < tok._base_size  # kept its SentencePiece id
    te.export_hf_tokenizer(tok, "chatml", str(tmp_path / "out"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in ("<tool>x", "a<tool>b", " <tool> c", "<|im_start|>user\n<tool>run<|im_end|>"):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
