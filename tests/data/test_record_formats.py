"""Record formats detected from the first records (NeMo input/output, question/answer,
Alpaca, OpenAI messages, ShareGPT conversations), given keys checked against them, and
``--max_rejected_fraction``; the preprocessor run in-process."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest

from instruct.preprocess_instruct_data import main
from megatron_ext.data.records import RecordError, RecordKeys, parse_line, resolve_record_keys
from megatron_ext.errors import DataError
from tests.conftest import CHATML, write_jsonl

QA = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.",
       **({"system": "Be brief."} if i % 2 else {})} for i in range(6)]


def preprocess(tmp_path: Path, records, name: str, sp_model: str, *flags: str) -> bytes:
    """The token file the CLI writes for ``records`` (in-process, one worker)."""
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    prefix = tmp_path / name
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--input", str(source), "--output_prefix", str(prefix), "--workers", "1",
                     "--no_progress", "--tokenizer_type", "SentencePieceTokenizer",
                     "--vocab_file", sp_model, "--vocab_extra_ids_list", ",".join(CHATML),
                     *flags]) == 0
    return Path(f"{prefix}-text.bin").read_bytes()


def as_format(fmt: str, record: dict) -> dict:
    """``record`` (question/answer/system) written in another format."""
    system = [record["system"]] if "system" in record else []
    if fmt == "input_output":
        return {"input": record["question"], "output": record["answer"],
                **({"system": record["system"]} if system else {})}
    if fmt == "openai":
        return {"messages": [{"role": "system", "content": s} for s in system]
                + [{"role": "user", "content": record["question"]},
                   {"role": "assistant", "content": record["answer"]}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "system", "value": s} for s in system]
                + [{"from": "human", "value": record["question"]},
                   {"from": "gpt", "value": record["answer"]}]}
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt,description", [
    ("input_output", "input/output (NeMo)"), ("openai", "OpenAI messages"),
    ("sharegpt", "ShareGPT conversations")])
def test_each_format_is_detected_and_tokenized_as_its_question_answer_records(
        tmp_path, sp_model, caplog, fmt, description):
    """Without keys every record is accepted (NeMo's records were all rejected, looking for
    'question'), the log names the format, and the ids equal the question/answer file's."""
    reference = preprocess(tmp_path, QA, "qa", sp_model, "--question_key", "question",
                           "--answer_key", "answer", "--system_key", "system")
    with caplog.at_level(logging.INFO, logger="megatron_ext.data.records"):
        got = preprocess(tmp_path, [as_format(fmt, r) for r in QA], fmt, sp_model)
    assert got == reference
    assert f"{fmt}.jsonl: {description}" in caplog.text
    assert f"detected from its first {len(QA)}" in caplog.text


def test_alpaca_joins_instruction_and_input_with_a_blank_line(tmp_path, sp_model):
    alpaca = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    qa = [{"question": "Translate to French.\n\nGood morning", "answer": "Bonjour"},
          {"question": "Say hi.", "answer": "Hi!"}]
    assert preprocess(tmp_path, alpaca, "alpaca", sp_model) == preprocess(
        tmp_path, qa, "qa", sp_model)


def test_mixed_formats_in_the_first_records_name_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [*QA[:3], "not json", as_format("sharegpt", QA[3])])
    with pytest.raises(DataError, match=rf"{path}:5: a record in the ShareGPT .* line 1 is in "
                                        r"the question/answer\(/system\) format"):
        resolve_record_keys(RecordKeys(), [str(path)])


def test_a_later_record_of_another_format_is_rejected_naming_it():
    keys = resolve_record_keys(RecordKeys("question", "answer"), [])
    with pytest.raises(RecordError, match="missing key 'question' \\(the record is in the "
                                          "Alpaca instruction/input/output format"):
        parse_line(b'{"instruction": "i", "input": "", "output": "o"}', keys, False)


def test_unknown_records_name_their_keys_and_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    with pytest.raises(DataError) as info:
        resolve_record_keys(RecordKeys(), [str(path)])
    message = str(info.value)
    assert message.startswith(f"{path}: no known record format (its first 2 records have the "
                              "keys 'prompt', 'completion')")
    assert "input/output (NeMo)" in message and "--question_key/--answer_key" in message


def test_given_keys_that_match_nothing_name_the_keys_the_file_has(tmp_path):
    path = write_jsonl(tmp_path / "nemo.jsonl", [{"input": "q", "output": "a"}] * 40)
    with pytest.raises(DataError) as info:
        resolve_record_keys(RecordKeys("question", "answer"), [str(path)])
    assert str(info.value) == (
        f"{path}: none of the first 40 records has the key(s) 'question', 'answer' "
        "(--question_key/--answer_key); their keys are 'input', 'output'; they look like "
        "input/output (NeMo) records: leave out the key flags to read them so")


def test_one_given_key_takes_the_other_from_the_record(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "response": "r"}])
    keys = resolve_record_keys(RecordKeys(question="prompt"), [str(path)])
    assert (keys.question, keys.answer) == ("prompt", "response")


def test_files_of_two_formats_are_refused(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", QA)
    two = write_jsonl(tmp_path / "two.jsonl", [as_format("openai", r) for r in QA])
    with pytest.raises(DataError, match=f"{two} holds OpenAI messages .* records, {one} "
                                        "question/answer"):
        resolve_record_keys(RecordKeys(), [str(one), str(two)])


def test_max_rejected_fraction_stops_with_the_reasons_and_writes_nothing(tmp_path, sp_model):
    records = [*QA[:4], {"question": "no answer"}]  # 1 of 5 rejected: 20%
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DataError) as info:
        preprocess(tmp_path, records, "bad", sp_model, "--max_rejected_fraction", "0.1",
                   "--rejects_file", str(rejects))
    message = str(info.value)
    source = tmp_path / "bad.jsonl"
    assert message.startswith(f"{source}: 1 of 5 records rejected (20.0%), more than "
                              f"--max_rejected_fraction 0.1; the first: {source}:5: missing "
                              "key 'answer'")
    assert f"in {rejects}" in message and "raise --max_rejected_fraction" in message
    assert "\n" not in message
    assert not (tmp_path / "bad-text.bin").exists()
    assert '"line": 5' in rejects.read_text()  # kept: the lines to fix
    preprocess(tmp_path, records, "bad", sp_model, "--max_rejected_fraction", "0.2")
    assert (tmp_path / "bad-text.bin").exists()


def test_evaluation_reads_alpaca_records_as_training_does(tmp_path):
    """tools/evaluate.py --context_key (what the launcher passes for Alpaca test splits)."""
    from megatron_ext.inference.prompts import read_records

    path = write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    records = read_records(str(path), "instruction", "output", context_key="input")
    keys = resolve_record_keys(RecordKeys(), [str(path)])
    trained = [parse_line(line.encode(), keys, False) for line in path.read_text().splitlines()]
    assert [r.conversation for r in records] == [c[:-1] for c in trained]
    assert [r.answers for r in records] == [("Bonjour",), ("Hi!",)]
