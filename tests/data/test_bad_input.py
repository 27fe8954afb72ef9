"""Bad input to the offline preprocessor: every case is rejected with its reason,
file and line, the good records around it are all written in order, and errors
the user must fix stop the run with one clear line and no output files.

Most cases run the CLI in-process (``main(argv)``); the cases in
``test_cli_subprocess_errors`` run the real script to check the exit status and
that stderr holds a single ``error: ...`` line and no traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CHATML, REPO, write_jsonl

from instruct.preprocess_instruct_data import main
from megatron_ext.errors import ConfigError, DataError, TokenizerError, UserError
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer

SCRIPT = "instruct/preprocess_instruct_data.py"
EXTRA_IDS = ",".join(CHATML)
OUTPUT_NAMES = ("-text.bin", "-text.idx", "-role.bin", "-role.idx", "-meta.json")
EXIT_TIMEOUT_S = 120  # each CLI run here takes about a second
BAD_LINE = 4  # 1-based line of the bad record in the standard layout below
SYSTEM, USER, ASSISTANT = 0, 1, 2


# --------------------------------------------------------------------------- helpers
def good(i: int) -> dict:
    return {"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}


def good_messages(i: int) -> dict:
    if i % 2:  # ShareGPT spelling on odd records
        return {"messages": [{"from": "human", "value": f"What is {i} plus {i}?"},
                             {"from": "gpt", "value": f"It is {2 * i}."}]}
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}


def chatml_text(i: int) -> str:
    return (f"<|im_start|>user\nWhat is {i} plus {i}?<|im_end|>\n"
            f"<|im_start|>assistant\nIt is {2 * i}.<|im_end|>\n")


def around(bad, make=good) -> list:
    """Three good records, the bad line (line 4), one more good record."""
    return [make(0), make(1), make(2), bad, make(3)]


def sp_flags(sp_model: str, extra_ids: str | None = EXTRA_IDS) -> list[str]:
    flags = ["--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model]
    if extra_ids:
        flags += ["--vocab_extra_ids_list", extra_ids]
    return flags


def hf_flags(hf_dir: str, extra_ids: str | None = EXTRA_IDS) -> list[str]:
    flags = ["--tokenizer_type", "HFTokenizer", "--vocab_file", hf_dir]
    if extra_ids:
        flags += ["--vocab_extra_ids_list", extra_ids]
    return flags


QA_KEYS = ["--question_key", "question", "--answer_key", "answer"]


@dataclass
class Result:
    inputs: list[str]
    prefix: str
    stdout: str
    meta: dict
    rejects: list[dict]
    tokens: list[list[int]]
    roles: list[list[int]]


def read_dataset(prefix: str) -> tuple[list[list[int]], list[list[int]]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text = IndexedDataset(prefix + "-text")
    role = IndexedDataset(prefix + "-role")
    assert len(text) == len(role)
    tokens = [text[i].tolist() for i in range(len(text))]
    roles = [role[i].tolist() for i in range(len(role))]
    assert [len(t) for t in tokens] == [len(r) for r in roles]
    return tokens, roles


def output_leftovers(directory: Path) -> list[str]:
    """Every file in ``directory`` that looks like a dataset output or a temporary."""
    return sorted(name for name in os.listdir(directory)
                  if name.endswith(OUTPUT_NAMES) or ".tmp." in name)


def preprocess(tmp_path: Path, lines, flags: list[str], *, name: str = "in.jsonl",
               extra_inputs: tuple[Path, ...] = (), prefix_name: str = "ds") -> Result:
    """Write ``lines`` to a JSONL file and run the CLI in-process on it."""
    source = write_jsonl(tmp_path / name, lines) if lines is not None else tmp_path / name
    inputs = [str(source), *map(str, extra_inputs)]
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    prefix = str(out_dir / prefix_name)
    rejects_file = tmp_path / f"{prefix_name}-rejects.jsonl"
    argv = ["--input", *inputs, "--output_prefix", prefix, "--rejects_file", str(rejects_file),
            "--no_progress", "--workers", "1", *flags]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    with open(prefix + "-meta.json", encoding="utf-8") as handle:
        meta = json.load(handle)
    with open(rejects_file, encoding="utf-8") as handle:
        rejects = [json.loads(line) for line in handle]
    tokens, roles = read_dataset(prefix)
    return Result(inputs, prefix, stdout.getvalue(), meta, rejects, tokens, roles)


def run_error(argv: list[str], error: type = UserError) -> str:
    """Run the CLI in-process, expect ``error``; returns its message."""
    with pytest.raises(error) as info, contextlib.redirect_stdout(io.StringIO()):
        main([*argv, "--no_progress", "--workers", "1"])
    message = str(info.value)
    assert "\n" not in message, "CLI errors are printed as one line"
    return message


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model):
    return build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML))


def decoded(result: Result, tokenizer, megatron_llm: bool = False) -> list[str]:
    return [tokenizer.decode(ids, doc_start=True, megatron_llm=megatron_llm)
            for ids in result.tokens]


def assert_one_reject(result: Result, code: str, reason_part: str, raw_text: str,
                      line: int = BAD_LINE, file_index: int = 0, total_lines: int = 5) -> None:
    """The bad line is reported in all three places with its file and 1-based line."""
    path = result.inputs[file_index]
    assert len(result.rejects) == 1, result.rejects
    reject = result.rejects[0]
    assert reject["file"] == path
    assert reject["line"] == line
    assert reject["code"] == code
    assert reason_part in reject["reason"]
    assert reject["text"] == raw_text
    # summary: counts by reason and the first rejects as FILE:LINE: reason
    assert f"{path}:{line}: {reject['reason']}" in result.stdout
    assert "rejected by reason:" in result.stdout
    assert any(row.split() == [code, "1"] for row in result.stdout.splitlines())
    counts = result.meta["counts"]
    assert counts["rejected_by_reason"] == {code: 1}
    assert counts["rejected"] == 1
    assert counts["records_in"] == total_lines
    assert counts["records_out"] == total_lines - 1 == len(result.tokens)


# --------------------------------------------------------------------------- rejected lines
def _raw(line) -> str:
    if isinstance(line, dict):
        return json.dumps(line, ensure_ascii=False)
    if isinstance(line, bytes):
        return line.decode("utf-8", errors="replace")
    return line


QA_CASES = [
    # id, bad line, code, part of the reason
    ("malformed_json", '{"question": "What?", "answer": ', "malformed_json", "malformed JSON"),
    ("malformed_json_single_quotes", "{'question': 'q', 'answer': 'a'}", "malformed_json",
     "malformed JSON"),
    ("trailing_garbage", '{"question": "q", "answer": "a"} extra', "malformed_json",
     "malformed JSON"),
    ("blank_line", "", "blank_line", "blank line"),
    ("whitespace_line", " \t ", "blank_line", "blank line"),
    ("json_list", '["What?", "It is."]', "not_an_object", "expected an object"),
    ("json_string", '"What is 2 plus 2?"', "not_an_object", "expected an object"),
    ("json_number", "42", "not_an_object", "expected an object"),
    ("json_null", "null", "not_an_object", "expected an object"),
    ("missing_question", {"answer": "It is 4."}, "missing_key", "missing key 'question'"),
    ("missing_answer", {"question": "What is 2 plus 2?"}, "missing_key", "missing key 'answer'"),
    ("misspelled_keys", {"input": "What?", "output": "It is."}, "missing_key",
     "missing key 'question'"),
    ("number_answer", {"question": "What is 2 plus 2?", "answer": 4}, "not_a_string",
     "key 'answer' is int"),
    ("null_question", {"question": None, "answer": "It is 4."}, "not_a_string",
     "key 'question' is NoneType"),
    ("list_question", {"question": ["a", "b"], "answer": "It is 4."}, "not_a_string",
     "key 'question' is list"),
    ("empty_question", {"question": "", "answer": "It is 4."}, "empty_text",
     "key 'question' is empty"),
    ("whitespace_answer", {"question": "What is 2 plus 2?", "answer": " \n\t "}, "empty_text",
     "key 'answer' is empty"),
    ("number_system", {"question": "What?", "answer": "It.", "system": 7}, "not_a_string",
     "system key 'system' is int"),
    ("invalid_utf8", b'{"question": "caf\xe9 au lait?", "answer": "\xff\xfe"}', "invalid_utf8",
     "invalid UTF-8 at byte 17"),
    ("truncated_utf8", '{"question": "日本", "answer": "x"}'.encode()[:16], "invalid_utf8",
     "invalid UTF-8"),
]


@pytest.mark.parametrize("bad,code,reason", [c[1:] for c in QA_CASES], ids=[c[0] for c in QA_CASES])
def test_bad_qa_line_is_rejected_and_reported(tmp_path, sp_model, sp_tokenizer, bad, code, reason):
    # chunk_size 2: the bad line is the second of the second chunk (line arithmetic)
    result = preprocess(tmp_path, around(bad), sp_flags(sp_model) + QA_KEYS
                        + ["--system_key", "system", "--chunk_size", "2"])
    assert_one_reject(result, code, reason, _raw(bad))
    assert decoded(result, sp_tokenizer) == [chatml_text(i) for i in range(4)]
    for roles in result.roles:
        assert roles[0] == USER and roles[-1] == ASSISTANT


MESSAGES_CASES = [
    ("unknown_role", {"messages": [{"role": "robot", "content": "beep"},
                                   {"role": "assistant", "content": "boop"}]},
     "unknown_role", "message 1 has unknown role 'robot'"),
    ("unknown_sharegpt_role", {"messages": [{"from": "human", "value": "hi"},
                                            {"from": "bard", "value": "hello"}]},
     "unknown_role", "message 2 has unknown role 'bard'"),
    ("no_assistant_turn", {"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello?"}]},
     "no_assistant_turn", "has no assistant turn"),
    ("messages_is_string", {"messages": "user: hi, assistant: hello"}, "bad_messages",
     "must be a non-empty list"),
    ("messages_is_object", {"messages": {"role": "user", "content": "hi"}}, "bad_messages",
     "must be a non-empty list"),
    ("messages_is_empty", {"messages": []}, "bad_messages", "must be a non-empty list"),
    ("message_is_string", {"messages": ["hi", "hello"]}, "bad_messages",
     "message 1 is not an object"),
    ("message_without_content", {"messages": [{"role": "user"},
                                              {"role": "assistant", "content": "Hello."}]},
     "missing_key", "message 1 has no 'content'"),
    ("message_without_role", {"messages": [{"role": "user", "content": "Hi"},
                                           {"content": "Hello."}]},
     "missing_key", "message 2 has no 'role'"),
    ("message_number_content", {"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": 5}]},
     "not_a_string", "message 2 'content' is int"),
    ("empty_assistant_turn", {"messages": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "  "}]},
     "empty_text", "message 2 (assistant) is empty"),
    ("missing_messages_key", {"conversation": []}, "missing_key", "missing key 'messages'"),
]


@pytest.mark.parametrize("bad,code,reason", [c[1:] for c in MESSAGES_CASES],
                         ids=[c[0] for c in MESSAGES_CASES])
def test_bad_messages_record_is_rejected_and_reported(tmp_path, sp_model, sp_tokenizer,
                                                      bad, code, reason):
    result = preprocess(tmp_path, around(bad, good_messages),
                        sp_flags(sp_model) + ["--messages_key", "messages", "--chunk_size", "3"])
    assert_one_reject(result, code, reason, _raw(bad))
    assert decoded(result, sp_tokenizer) == [chatml_text(i) for i in range(4)]


def test_reject_names_the_right_file_and_line_with_several_inputs(tmp_path, sp_model):
    """Line numbers restart at 1 in each input file, .jsonl.gz included."""
    second = tmp_path / "second.jsonl.gz"
    second.write_bytes(gzip.compress(b"".join(
        (json.dumps(r) + "\n").encode() for r in [good(10), good(11), {"question": "q"}])))
    result = preprocess(tmp_path, [good(0), good(1)], sp_flags(sp_model) + QA_KEYS,
                        extra_inputs=(second,))
    assert_one_reject(result, "missing_key", "missing key 'answer'", '{"question": "q"}',
                      line=3, file_index=1, total_lines=5)
    assert result.rejects[0]["file"] == str(second)


def test_every_bad_line_is_counted_by_reason(tmp_path, sp_model):
    lines = [good(0), "not json", {"answer": "a"}, good(1), "", {"question": "q"}, b"\xff",
             good(2)]
    result = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS + ["--chunk_size", "3"])
    assert [(r["line"], r["code"]) for r in result.rejects] == [
        (2, "malformed_json"), (3, "missing_key"), (5, "blank_line"), (6, "missing_key"),
        (7, "invalid_utf8")]
    assert all(r["file"] == result.inputs[0] for r in result.rejects)
    assert result.meta["counts"]["rejected_by_reason"] == {
        "blank_line": 1, "invalid_utf8": 1, "malformed_json": 1, "missing_key": 2}
    assert result.meta["counts"]["records_out"] == len(result.tokens) == 3
    # the summary shows the first five rejects with FILE:LINE
    for line in (2, 3, 5, 6, 7):
        assert f"{result.inputs[0]}:{line}: " in result.stdout


# --------------------------------------------------------------------------- accepted oddities
def test_empty_or_absent_system_prompt_is_left_out_in_chatml(tmp_path, sp_model, sp_tokenizer):
    lines = [
        {**good(0), "system": ""},
        good(1),  # no system key
        {**good(2), "system": None},
        {**good(3), "system": "   "},
        {**good(4), "system": "Be brief."},
    ]
    result = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS + ["--system_key", "system"])
    assert result.rejects == []
    assert result.meta["counts"]["rejected"] == 0
    texts = decoded(result, sp_tokenizer)
    assert texts[:4] == [chatml_text(i) for i in range(4)]
    assert texts[4] == "<|im_start|>system\nBe brief.<|im_end|>\n" + chatml_text(4)
    for roles in result.roles[:4]:
        assert SYSTEM not in roles
    assert result.roles[4][0] == SYSTEM


def test_empty_system_prompt_is_rendered_in_megatron_llm_format(tmp_path, sp_model, sp_tokenizer):
    lines = [{**good(0), "system": ""}, good(1), {**good(2), "system": "Be brief."}]
    result = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS
                        + ["--system_key", "system", "--chat_format", "megatron-llm"])
    assert result.rejects == []
    texts = decoded(result, sp_tokenizer, megatron_llm=True)

    def turns(i):
        return (f"<|im_start|>question\nWhat is {i} plus {i}?<|im_end|>\n"
                f"<|im_start|>answer\nIt is {2 * i}.<|im_end|>\n")

    assert texts[0] == "<|im_start|>system\n<|im_end|>\n" + turns(0)
    assert texts[1] == turns(1)  # key absent: no system turn at all
    assert texts[2] == "<|im_start|>system\nBe brief.<|im_end|>\n" + turns(2)
    empty_system = sp_tokenizer.encode_segments(["<|im_start|>system\n<|im_end|>\n"], [True],
                                                megatron_llm=True)[0]
    assert result.tokens[0][:len(empty_system)] == empty_system
    assert result.roles[0][:len(empty_system)] == [SYSTEM] * len(empty_system)
    assert SYSTEM not in result.roles[0][len(empty_system):]
    assert SYSTEM not in result.roles[1]


def test_utf8_bom_on_first_line_is_accepted(tmp_path, sp_model, sp_tokenizer):
    bom = b"\xef\xbb\xbf"
    second = tmp_path / "second.jsonl"
    second.write_bytes(bom + json.dumps(good(2)).encode() + b"\n")
    lines = [bom + json.dumps(good(0)).encode(), good(1)]
    result = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS, extra_inputs=(second,))
    assert result.rejects == []
    assert result.meta["counts"]["records_out"] == 3
    assert decoded(result, sp_tokenizer) == [chatml_text(i) for i in range(3)]


def test_gzip_input_gives_byte_identical_outputs(tmp_path, sp_model):
    lines = [good(0), "{broken", good(1), {"question": "q", "answer": ""}, good(2),
             {"question": "Grüße 日本 🤖?", "answer": "x² ≤ ∞"}]
    plain = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS, prefix_name="plain")
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "in.jsonl").read_bytes()))
    gz = preprocess(tmp_path, None, sp_flags(sp_model) + QA_KEYS, name="in.jsonl.gz",
                    prefix_name="packed")
    assert len(plain.tokens) == 4
    for suffix in ("-text.bin", "-text.idx", "-role.bin", "-role.idx"):
        assert Path(plain.prefix + suffix).read_bytes() == Path(gz.prefix + suffix).read_bytes()
    # meta.json differs only in the input it names (path and on-disk size)
    assert plain.meta["inputs"] == [{"path": plain.inputs[0],
                                     "bytes": (tmp_path / "in.jsonl").stat().st_size}]
    assert gz.meta["inputs"] == [{"path": str(packed), "bytes": packed.stat().st_size}]
    assert {**plain.meta, "inputs": None} == {**gz.meta, "inputs": None}
    assert [{**r, "file": None} for r in plain.rejects] == [{**r, "file": None} for r in gz.rejects]
    assert [r["line"] for r in gz.rejects] == [2, 4]


def test_corrupt_gzip_input_is_an_error_naming_the_file(tmp_path, sp_model):
    packed = tmp_path / "in.jsonl.gz"
    data = gzip.compress(b"".join((json.dumps(good(i)) + "\n").encode() for i in range(200)))
    packed.write_bytes(data[: len(data) // 2])
    (tmp_path / "out").mkdir()
    message = run_error(["--input", str(packed), "--output_prefix",
                         str(tmp_path / "out" / "ds"), *sp_flags(sp_model), *QA_KEYS],
                        DataError)
    assert str(packed) in message
    assert output_leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------- over-long records
LONG_ANSWER = " ".join(["alpha beta gamma delta"] * 60)
LIMIT = 64


def test_overlong_drop_rejects_too_long(tmp_path, sp_model, sp_tokenizer):
    long = {"question": "Tell me a long story?", "answer": LONG_ANSWER}
    result = preprocess(tmp_path, around(long), sp_flags(sp_model) + QA_KEYS
                        + ["--max_seq_length", str(LIMIT), "--overlong", "drop"])
    assert_one_reject(result, "too_long", f"longer than --max_seq_length {LIMIT}", _raw(long))
    assert decoded(result, sp_tokenizer) == [chatml_text(i) for i in range(4)]
    assert result.meta["counts"]["truncated"] == 0
    assert max(len(t) for t in result.tokens) <= LIMIT


def test_overlong_truncate_keeps_exactly_max_seq_length_tokens(tmp_path, sp_model):
    long = {"question": "Tell me a long story?", "answer": LONG_ANSWER}
    lines = around(long)
    full = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS, prefix_name="full")
    assert len(full.tokens[3]) > LIMIT
    cut = preprocess(tmp_path, lines, sp_flags(sp_model) + QA_KEYS
                     + ["--max_seq_length", str(LIMIT), "--overlong", "truncate"],
                     prefix_name="cut")
    assert cut.rejects == []
    counts = cut.meta["counts"]
    assert counts["truncated"] == 1 and counts["rejected"] == 0 and counts["records_out"] == 5
    assert any(row.split() == ["records", "truncated", "1"] for row in cut.stdout.splitlines())
    assert [len(t) for t in cut.tokens] == [len(t) for t in full.tokens[:3]] + [LIMIT] + \
        [len(full.tokens[4])]
    assert cut.tokens[3] == full.tokens[3][:LIMIT]
    assert cut.roles[3] == full.roles[3][:LIMIT]
    assert cut.roles[3][-1] == ASSISTANT and cut.roles[3][0] == USER
    # the records around it are untouched
    assert cut.tokens[:3] + cut.tokens[4:] == full.tokens[:3] + full.tokens[4:]
    assert cut.meta["lengths"]["max"] == LIMIT


def test_overlong_truncate_rejects_a_record_whose_prompt_fills_the_limit(tmp_path, sp_model,
                                                                         sp_tokenizer):
    long = {"question": LONG_ANSWER + "?", "answer": "Yes."}
    result = preprocess(tmp_path, around(long), sp_flags(sp_model) + QA_KEYS
                        + ["--max_seq_length", str(LIMIT), "--overlong", "truncate"])
    assert_one_reject(result, "too_long", "would remove the whole answer", _raw(long))
    assert result.meta["counts"]["truncated"] == 0
    assert decoded(result, sp_tokenizer) == [chatml_text(i) for i in range(4)]


# --------------------------------------------------------------------------- run-stopping errors
def test_strict_stops_at_first_bad_record_and_writes_nothing(tmp_path, sp_model):
    source = write_jsonl(tmp_path / "in.jsonl",
                         [good(0), good(1), good(2), {"question": "q"}, good(3), "{bad"])
    out = tmp_path / "out"
    out.mkdir()
    message = run_error(["--input", str(source), "--output_prefix", str(out / "ds"),
                         *sp_flags(sp_model), *QA_KEYS, "--strict", "--chunk_size", "2"],
                        DataError)
    assert message.startswith(f"{source}:4: missing key 'answer'")
    assert "--strict" in message
    assert f"{source}:6" not in message
    assert output_leftovers(out) == []


def test_all_records_rejected_is_an_error_and_writes_nothing(tmp_path, sp_model):
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"question": "q", "answer": " "}, {"question": "q2"}, ""])
    out = tmp_path / "out"
    out.mkdir()
    message = run_error(["--input", str(source), "--output_prefix", str(out / "ds"),
                         *sp_flags(sp_model), *QA_KEYS], DataError)
    assert "no record was accepted out of 3" in message
    assert f"{source}:1: key 'answer' is empty" in message
    assert f"{source}:2: missing key 'answer'" in message
    assert "--question_key" in message
    assert output_leftovers(out) == []


def test_empty_input_is_an_error_and_writes_nothing(tmp_path, sp_model):
    source = tmp_path / "empty.jsonl"
    source.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    message = run_error(["--input", str(source), "--output_prefix", str(out / "ds"),
                         *sp_flags(sp_model), *QA_KEYS], DataError)
    assert "no record was accepted out of 0" in message and "empty" in message
    assert output_leftovers(out) == []


def test_missing_input_file_is_an_error_naming_it(tmp_path, sp_model):
    missing = tmp_path / "nope.jsonl"
    message = run_error(["--input", str(missing), "--output_prefix",
                         str(tmp_path / "ds"), *sp_flags(sp_model)], DataError)
    assert str(missing) in message and "does not exist" in message
    assert output_leftovers(tmp_path) == []


def test_glob_matching_nothing_is_an_error(tmp_path, sp_model):
    write_jsonl(tmp_path / "real.jsonl", [good(0)])
    pattern = str(tmp_path / "train-*.jsonl")
    message = run_error(["--input", pattern, "--output_prefix", str(tmp_path / "ds"),
                         *sp_flags(sp_model)], DataError)
    assert pattern in message and "matches no file" in message
    assert output_leftovers(tmp_path) == []


@pytest.fixture
def small_input(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [good(0), good(1)])


def test_garbage_sentencepiece_model_is_an_error_naming_it(tmp_path, small_input):
    garbage = tmp_path / "x.model"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *sp_flags(str(garbage)), *QA_KEYS],
                        TokenizerError)
    assert str(garbage) in message and "SentencePiece" in message
    assert output_leftovers(tmp_path) == []


def test_missing_sentencepiece_model_is_an_error_naming_it(tmp_path, small_input):
    missing = tmp_path / "tokenizer.model"
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *sp_flags(str(missing)), *QA_KEYS],
                        TokenizerError)
    assert str(missing) in message and "does not exist" in message


def test_garbage_tokenizer_json_is_an_error_naming_it(tmp_path, small_input):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}')
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *hf_flags(str(garbage)), *QA_KEYS],
                        TokenizerError)
    assert str(garbage) in message
    assert output_leftovers(tmp_path) == []


def test_tokenizer_json_with_sentencepiece_type_suggests_hf(tmp_path, small_input,
                                                           hf_tokenizer_dir):
    tokenizer_json = os.path.join(hf_tokenizer_dir, "tokenizer.json")
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *sp_flags(tokenizer_json), *QA_KEYS],
                        TokenizerError)
    assert tokenizer_json in message
    assert "--tokenizer_type HFTokenizer" in message
    assert output_leftovers(tmp_path) == []


def test_missing_output_directory_is_an_error_saying_to_create_it(tmp_path, sp_model,
                                                                  small_input):
    out_dir = tmp_path / "not" / "there"
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(out_dir / "ds"), *sp_flags(sp_model), *QA_KEYS],
                        ConfigError)
    assert str(out_dir) in message and "does not exist" in message
    assert f"mkdir -p {out_dir}" in message
    assert not out_dir.exists()


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_chatml_without_its_special_tokens_names_the_flag_to_add(tmp_path, small_input, kind,
                                                                 sp_model, hf_tokenizer_dir):
    if kind == "sentencepiece":
        flags = sp_flags(sp_model, extra_ids=None)
    else:
        flags = hf_flags(hf_tokenizer_dir, extra_ids=None)
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *flags, *QA_KEYS], TokenizerError)
    assert "<|im_start|>" in message
    assert '--vocab_extra_ids_list "<|im_start|>,<|im_end|>"' in message
    assert output_leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_no_new_tokens_with_unknown_extra_id_is_an_error(tmp_path, small_input, kind,
                                                         sp_model, hf_tokenizer_dir):
    # the first ids are in the vocabulary already; only the last one is missing
    if kind == "sentencepiece":
        flags = sp_flags(sp_model, "<s>,</s>,<|not_in_vocab|>")
        source = sp_model
    else:
        flags = hf_flags(hf_tokenizer_dir, "<|begin_of_text|>,<|end_of_text|>,<|not_in_vocab|>")
        source = os.path.join(hf_tokenizer_dir, "tokenizer.json")
    message = run_error(["--input", str(small_input), "--output_prefix",
                         str(tmp_path / "ds"), *flags, *QA_KEYS, "--no_new_tokens"],
                        TokenizerError)
    assert message.startswith("--no_new_tokens: '<|not_in_vocab|>' is not in the vocabulary of "
                              f"{source}")
    assert "<s>" not in message and "<|begin_of_text|>" not in message
    assert output_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- real subprocess
@pytest.fixture(scope="module")
def subprocess_errors(tmp_path_factory, sp_model):
    """Run the script once per error case, all at once; the results by case name."""
    root = tmp_path_factory.mktemp("cli_errors")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # as the cli_env fixture (function-scoped)
    good_input = write_jsonl(root / "good.jsonl", [good(i) for i in range(5)])
    strict_input = write_jsonl(root / "strict.jsonl",
                               [good(i) for i in range(40)] + ["[1, 2]"]
                               + [good(i) for i in range(40, 60)] + ["{bad"])
    strict_error = f"error: {strict_input}:41: JSON list, expected an object"
    rejected_input = write_jsonl(root / "rejected.jsonl", [{"question": "q", "answer": ""}] * 3)
    nemo_input = write_jsonl(root / "nemo.jsonl", [{"input": "q", "output": "a"}] * 3)
    garbage_model = root / "x.model"
    garbage_model.write_bytes(random.Random(0).randbytes(4096))
    missing_dir = root / "no_such_dir"
    cases = {  # name: (arguments, expected start of the error line)
        "missing_input": (["--input", str(root / "missing.jsonl"), *sp_flags(sp_model)],
                          f"error: input file {root / 'missing.jsonl'} does not exist"),
        "glob_no_match": (["--input", str(root / "nothing-*.jsonl"), *sp_flags(sp_model)],
                          f"error: --input '{root / 'nothing-*.jsonl'}' matches no file"),
        "strict": (["--input", str(strict_input), "--strict", "--chunk_size", "16",
                    *sp_flags(sp_model)], strict_error),
        # 2 workers and 1-record chunks: the first bad record in input order, not in time
        "strict_workers": (["--input", str(strict_input), "--strict", "--workers", "2",
                            "--chunk_size", "1", *sp_flags(sp_model)], strict_error),
        "all_rejected": (["--input", str(rejected_input), *sp_flags(sp_model)],
                         "error: no record was accepted out of 3"),
        # keys that match nothing: the keys the records have, before any tokenizer is read
        "other_keys": (["--input", str(nemo_input), *sp_flags(str(garbage_model))],
                       f"error: {nemo_input}: none of the first 3 records has the key(s) "
                       "'question', 'answer' (--question_key/--answer_key); their keys are "
                       "'input', 'output'; they look like input/output (NeMo) records"),
        "garbage_tokenizer": (["--input", str(good_input), *sp_flags(str(garbage_model))],
                              f"error: cannot read {garbage_model} as a SentencePiece model"),
        "no_chatml_tokens": (["--input", str(good_input), *sp_flags(sp_model, None)],
                             "error: chat format 'chatml' needs the special tokens "
                             "<|im_start|>, <|im_end|>"),
        "missing_output_dir": (["--input", str(good_input), *sp_flags(sp_model),
                                "--output_prefix", str(missing_dir / "ds")],
                               f"error: output directory {missing_dir} does not exist: create it"),
    }
    procs = {}
    for name, (argv, _) in cases.items():
        (root / name).mkdir()
        workers = [] if "--workers" in argv else ["--workers", "1"]
        procs[name] = subprocess.Popen(
            [sys.executable, SCRIPT, "--output_prefix", str(root / name / "ds"), *QA_KEYS,
             *workers, *argv],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group, for cleanup
    results = {}
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # reported by the test of this case
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                err += f"\n(did not exit within {EXIT_TIMEOUT_S} s: killed)"
            results[name] = (proc.returncode, out, err, cases[name][1], root / name)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not missing_dir.exists()
    return results


SUBPROCESS_CASES = ["missing_input", "glob_no_match", "strict", "strict_workers", "all_rejected",
                    "other_keys",
                    "garbage_tokenizer", "no_chatml_tokens", "missing_output_dir"]


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_subprocess_errors(subprocess_errors, case):
    returncode, stdout, stderr, expected, out_dir = subprocess_errors[case]
    assert returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0]
    assert errors[0].startswith(expected), errors[0]
    assert "Preprocessing summary" not in stdout
    assert output_leftovers(out_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_subprocess_errors_print_no_traceback(subprocess_errors, case):
    stderr = subprocess_errors[case][2]
    assert "Traceback" not in stderr, stderr


# --------------------------------------------------------------------------- inputs that once crashed
def test_lone_surrogate_escape_is_rejected(tmp_path, sp_model):
    result = preprocess(tmp_path, around('{"question": "bad \\ud800 text", "answer": "a"}'),
                        sp_flags(sp_model) + QA_KEYS)
    assert len(result.rejects) == 1 and result.rejects[0]["line"] == BAD_LINE
    assert result.rejects[0]["code"] == "invalid_unicode"
    assert len(result.tokens) == 4


def test_deeply_nested_json_is_rejected(tmp_path, sp_model):
    result = preprocess(tmp_path, around("[" * 100_000), sp_flags(sp_model) + QA_KEYS)
    assert [(r["line"], r["code"]) for r in result.rejects] == [(BAD_LINE, "malformed_json")]
    assert len(result.tokens) == 4


def test_rejects_file_in_missing_directory_is_a_user_error(tmp_path, sp_model, small_input):
    with pytest.raises(UserError):
        main(["--input", str(small_input), "--output_prefix", str(tmp_path / "ds"),
              "--rejects_file", str(tmp_path / "nodir" / "rejects.jsonl"), "--no_progress",
              "--workers", "1",
              *sp_flags(sp_model), *QA_KEYS])


def test_pretrained_sentencepiece_layout_keeps_its_ids_and_is_told_apart(
        tmp_path, sp_model, small_input, sp_tokenizer):
    """--no_megatron_llm_specials: a pretrained model's tokenizer.model gains only the missing
    extra ids (no <CLS> <SEP> <EOD> <MASK> <PAD>); data made with the other layout is refused
    with the flag named."""
    import sentencepiece as spm

    plain = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML,
                                            megatron_llm_specials=False))
    size = spm.SentencePieceProcessor(model_file=sp_model).get_piece_size()
    assert plain.vocab_size == size + len(CHATML)
    assert [plain.token_id(t) for t in CHATML] == [size, size + 1]
    assert set(plain.special_tokens) == {*CHATML, plain.bos_token, plain.eos_token}
    assert plain.identity()["megatron_llm_specials"] is False
    assert "megatron_llm_specials" not in sp_tokenizer.identity()  # old identities still match
    assert "<CLS>" in sp_tokenizer.special_tokens

    prefix = str(tmp_path / "out")
    main(["--input", str(small_input), "--output_prefix", prefix, "--tokenizer_type",
          "SentencePieceTokenizer", "--vocab_file", sp_model, "--vocab_extra_ids_list",
          ",".join(CHATML), "--question_key", "question", "--answer_key", "answer",
          "--no_progress", "--workers", "1"])
    from megatron_ext.data.instruction_dataset import InstructionDataset

    with pytest.raises(UserError, match="--no_megatron_llm_specials"):
        InstructionDataset(prefix).check_tokenizer(plain.identity())
    InstructionDataset(prefix).check_tokenizer(sp_tokenizer.identity())
