"""Preprocessor output: round trip, role alignment, formats, tokenizers, workers, readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from instruct.preprocess_instruct_data import build_parser, config_from_args
from megatron_ext.data.chat_formats import build_chat_format
from megatron_ext.data.preprocess import run_preprocess
from megatron_ext.data.records import Message
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
from tests.conftest import CHATML, LLAMA3, UNICODE_TEXTS, qa_records, write_jsonl

ROLE = {"system": 0, "user": 1, "assistant": 2}


def preprocess(tmp_path: Path, records, tokenizer_type: str, vocab_file: str, *extra,
               extra_ids=CHATML, name="out"):
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    prefix = tmp_path / name
    argv = ["--workers", "1",  # in-process: never fork the pytest process unless asked
            "--input", str(source), "--output_prefix", str(prefix),
            "--tokenizer_type", tokenizer_type, "--vocab_file", vocab_file,
            "--question_key", "question", "--answer_key", "answer", "--no_progress", *extra]
    if extra_ids:
        argv += ["--vocab_extra_ids_list", ",".join(extra_ids)]
    summary = run_preprocess(config_from_args(build_parser().parse_args(argv)))
    return prefix, summary


def read(prefix: Path):
    text = IndexedDataset(f"{prefix}-text")
    role = IndexedDataset(f"{prefix}-role")
    # copies: megatron-core's IndexedDataset unmaps its file when collected
    return [(np.array(text[i]), np.array(role[i])) for i in range(len(text))]


def role_runs(tokens, roles):
    """Consecutive (role, tokens) runs."""
    runs = []
    for token, role in zip(tokens.tolist(), roles.tolist()):
        if runs and runs[-1][0] == role:
            runs[-1][1].append(token)
        else:
            runs.append((role, [token]))
    return runs


def tokenizer_for(kind, sp_model, hf_dir, extra_ids=CHATML):
    if kind == "sp":
        return "SentencePieceTokenizer", sp_model, build_tokenizer(
            TokenizerConfig("SentencePieceTokenizer", sp_model, tuple(extra_ids)))
    return "HFTokenizer", hf_dir, build_tokenizer(TokenizerConfig("HFTokenizer", hf_dir, tuple(extra_ids)))


def expected_segments(tok, fmt_name, record, template=None):
    messages = []
    if record.get("system"):
        messages.append(Message("system", record["system"]))
    if "messages" in record:
        aliases = {"human": "user", "gpt": "assistant"}
        for m in record["messages"]:
            role = m.get("role", m.get("from"))
            messages.append(Message(aliases.get(role, role), m.get("content", m.get("value"))))
    else:
        messages += [Message("user", record["question"]), Message("assistant", record["answer"])]
    return build_chat_format(fmt_name, tok, template).render(tuple(messages))


def check_record(tok, tokens, roles, segments):
    """Each role run decodes to its message's full text, special tokens included."""
    merged = []
    for text, role in segments:
        if merged and merged[-1][1] == role:
            merged[-1] = (merged[-1][0] + text, role)
        else:
            merged.append((text, role))
    runs = role_runs(tokens, roles)
    assert [r for r, _ in runs] == [r for _, r in merged]
    for index, ((role, ids), (text, _)) in enumerate(zip(runs, merged)):
        assert tok.decode(ids, doc_start=index == 0) == text
    assert tok.decode(tokens.tolist(), doc_start=True) == "".join(t for t, _ in segments)


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_chatml_round_trip_and_role_alignment(tmp_path, sp_model, hf_tokenizer_dir, kind):
    ttype, vocab, tok = tokenizer_for(kind, sp_model, hf_tokenizer_dir)
    records = qa_records(60) + [{"question": q, "answer": a} for q, a in
                                zip(UNICODE_TEXTS, reversed(UNICODE_TEXTS))]
    prefix, summary = preprocess(tmp_path, records, ttype, vocab, "--system_key", "system")
    rows = read(prefix)
    assert len(rows) == len(records) == summary.stats.records_out
    for record, (tokens, roles) in zip(records, rows):
        assert len(tokens) == len(roles)
        check_record(tok, tokens, roles, expected_segments(tok, "chatml", record))
        # special tokens are single ids and belong to their message's role
        start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
        n_messages = 3 if record.get("system") else 2
        assert (tokens == start).sum() == (tokens == end).sum() == n_messages
        assert roles[0] == (0 if record.get("system") else 1)
        assert roles[-1] == 2 and tokens[roles == 2][0] == start


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_multi_turn_openai_and_sharegpt(tmp_path, sp_model, hf_tokenizer_dir, kind):
    ttype, vocab, tok = tokenizer_for(kind, sp_model, hf_tokenizer_dir)
    records = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"from": "human", "value": "Name a colour"},
                      {"from": "gpt", "value": "Blue"},
                      {"from": "human", "value": "Another"},
                      {"from": "gpt", "value": "Grün 🤖"}]},
    ]
    prefix, _ = preprocess(tmp_path, records, ttype, vocab, "--messages_key", "messages")
    rows = read(prefix)
    for record, (tokens, roles) in zip(records, rows):
        check_record(tok, tokens, roles, expected_segments(tok, "chatml", record))
    assert [r for r, _ in role_runs(*rows[0])] == [0, 1, 2, 1, 2]
    assert [r for r, _ in role_runs(*rows[1])] == [1, 2, 1, 2]


@pytest.mark.parametrize("kind", ["sp", "hf"])
@pytest.mark.parametrize("fmt", ["llama3", "alpaca", "megatron-llm", "template"])
def test_every_chat_format(tmp_path, sp_model, hf_tokenizer_dir, kind, fmt):
    extra_ids = {"llama3": LLAMA3, "alpaca": (), "megatron-llm": CHATML, "template": ()}[fmt]
    ttype, vocab, tok = tokenizer_for(kind, sp_model, hf_tokenizer_dir, extra_ids)
    template = "{system}\n\nUser: {input}\nAssistant: {output}" + tok.eos_token
    args = ["--system_key", "system", "--chat_format", fmt]
    if fmt == "template":
        args = ["--system_key", "system", "--prompt_template", template.replace("\n", "\\n")]
    records = qa_records(12, seed=3)
    prefix, _ = preprocess(tmp_path, records, ttype, vocab, *args, extra_ids=extra_ids)
    rows = read(prefix)
    assert len(rows) == len(records)
    for record, (tokens, roles) in zip(records, rows):
        segments = expected_segments(tok, fmt, record, template if fmt == "template" else None)
        if fmt == "megatron-llm":
            # every message tokenized on its own, each piece with SentencePiece's prefix
            ids = [t for text, _ in segments for t in tok.encode_segments([text], [True], True)[0]]
            assert tokens.tolist() == ids
            continue
        check_record(tok, tokens, roles, segments)
        assert roles[-1] == 2
    text = tok.decode(rows[0][0].tolist(), doc_start=True)
    if fmt == "llama3":
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"
                             + records[0]["answer"].strip() + "<|eot_id|>")
    if fmt == "alpaca":
        assert text.startswith((tok.bos_token or "") + "You are a helpful assistant.\n\n### Instruction:\n")
        assert text.endswith("### Response:\n" + records[0]["answer"] + tok.eos_token)
        assert rows[0][0][0] == tok.bos_id and rows[0][0][-1] == tok.eos_id
    if fmt == "template":
        assert text == (f"{records[0]['system']}\n\nUser: {records[0]['question']}\n"
                        f"Assistant: {records[0]['answer']}{tok.eos_token}")


def reference_megatron_llm(sp_model: str, extra_ids, record, system_key=True):
    """Megatron-LLM's preprocessing, written from its documented behaviour.

    Vocabulary: the SentencePiece pieces, then <CLS> <SEP> <EOD> <MASK>, the pad
    piece (or <PAD>), bos, eos, then the extra ids, each appended when new.
    Each message is formatted as <|im_start|>{role}\\n{text}<|im_end|>\\n and
    tokenized on its own: split at the earliest special token, every plain
    piece encoded by SentencePiece (dummy prefix included).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    vocab = {sp.id_to_piece(i): i for i in range(len(sp))}
    specials = {}
    for token in ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>", "<s>", "</s>", *extra_ids]:
        vocab.setdefault(token, len(vocab))
        specials[token] = vocab[token]

    def tokenize(text):
        ids = []
        while True:
            hits = {t: text.find(t) for t in specials if text.find(t) >= 0}
            if not hits:
                return ids + sp.encode(text)
            token = min(hits, key=hits.get)
            ids += sp.encode(text[: hits[token]]) + [specials[token]]
            text = text[hits[token] + len(token):]

    tokens, roles = [], []
    parts = []
    if system_key and "system" in record:
        parts.append(("system", record["system"], 0))
    parts += [("question", record["question"], 1), ("answer", record["answer"], 2)]
    for name, text, role in parts:
        ids = tokenize(f"<|im_start|>{name}\n{text}<|im_end|>\n")
        tokens += ids
        roles += [role] * len(ids)
    return tokens, roles


def test_megatron_llm_format_matches_megatron_llm_token_for_token(tmp_path, sp_model):
    records = qa_records(40, seed=11)
    for index, record in enumerate(records):
        if "system" in record and index % 2:
            record["system"] = ""  # Megatron-LLM renders an empty system turn
    records.append({"question": "a <s> inside </s> text", "answer": "<|im_end|> early", "system": ""})
    prefix, _ = preprocess(tmp_path, records, "SentencePieceTokenizer", sp_model,
                           "--system_key", "system", "--chat_format", "megatron-llm")
    rows = read(prefix)
    assert len(rows) == len(records)
    for record, (tokens, roles) in zip(records, rows):
        ref_tokens, ref_roles = reference_megatron_llm(sp_model, CHATML, record)
        assert tokens.tolist() == ref_tokens
        assert roles.tolist() == ref_roles


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_extra_ids_after_vocab_and_never_split(tmp_path, sp_model, hf_tokenizer_dir, kind):
    ttype, vocab, tok = tokenizer_for(kind, sp_model, hf_tokenizer_dir, CHATML + ("[bib_ref]",))
    base = {"sp": 1500 + 5, "hf": 1500}[kind]  # Megatron-LLM adds <CLS> <SEP> <EOD> <MASK> <PAD> first
    assert [tok.special_tokens[t] for t in CHATML + ("[bib_ref]",)] == [base, base + 1, base + 2]
    assert tok.vocab_size == base + 3
    records = [{"question": "cite[bib_ref]here<|im_start|>", "answer": "x[bib_ref]y"}]
    prefix, summary = preprocess(tmp_path, records, ttype, vocab,
                                 extra_ids=CHATML + ("[bib_ref]",))
    tokens, _ = read(prefix)[0]
    assert (tokens == base + 2).sum() == 2
    assert (tokens == base).sum() == 3  # two turn starts and the one in the question
    assert summary.meta["tokenizer"]["special_tokens"]["[bib_ref]"] == base + 2


def test_no_new_tokens_keeps_the_base_vocabulary(tmp_path, tmp_path_factory):
    from megatron_ext.tokenizers.training import train_sentencepiece

    from tests.conftest import _corpus

    model = train_sentencepiece(_corpus()[:300], str(tmp_path / "tok"), vocab_size=800,
                                user_defined_symbols=CHATML)
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", model, CHATML, new_tokens=False))
    assert tok.vocab_size == 800
    assert "<CLS>" not in tok.special_tokens
    prefix, _ = preprocess(tmp_path, qa_records(5), "SentencePieceTokenizer", model, "--no_new_tokens")
    tokens, _ = read(prefix)[0]
    assert tokens.max() < 800 and tok.special_tokens["<|im_start|>"] in tokens.tolist()


def test_workers_1_and_2_give_byte_identical_files(tmp_path, sp_model):
    records = qa_records(700, seed=5)
    outputs = []
    for workers in (1, 2):
        directory = tmp_path / f"w{workers}"
        directory.mkdir()
        prefix, _ = preprocess(directory, records, "SentencePieceTokenizer", sp_model,
                               "--system_key", "system", "--workers", str(workers),
                               "--chunk_size", "50")
        outputs.append({suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in
                        ("-text.bin", "-text.idx", "-role.bin", "-role.idx")})
        meta = json.loads(Path(f"{prefix}-meta.json").read_text())
        meta["inputs"] = None  # the input path differs between the two directories
        outputs[-1]["meta"] = meta
    assert outputs[0] == outputs[1]


def test_megatron_core_reader_compatibility(tmp_path, sp_model):
    records = qa_records(30)
    prefix, summary = preprocess(tmp_path, records, "SentencePieceTokenizer", sp_model)
    text = IndexedDataset(f"{prefix}-text")
    role = IndexedDataset(f"{prefix}-role")
    assert len(text) == len(role) == 30
    assert text.index.dtype == np.uint16 and role.index.dtype == np.uint8
    assert text.document_indices.tolist() == list(range(31))  # one document per record
    assert np.array_equal(text.sequence_lengths, role.sequence_lengths)
    assert int(text.sequence_lengths.sum()) == summary.meta["tokens"]["total"]
    # partial reads and pickling (as DataLoader workers do) work too
    assert np.array_equal(text.get(3, offset=2, length=4), text[3][2:6])
    import pickle

    clone = pickle.loads(pickle.dumps(text))
    assert np.array_equal(clone[7], text[7])


def test_meta_json_content(tmp_path, sp_model):
    records = qa_records(25, seed=2) + ["not json"]
    full_prefix, _ = preprocess(tmp_path, records, "SentencePieceTokenizer", sp_model,
                                "--system_key", "system", name="full")
    full = read(full_prefix)
    limit = 60
    prompt = [int(np.argmax(r == 2)) for _, r in full]
    expect_truncated = sum(1 for (t, _), p in zip(full, prompt) if len(t) > limit and p < limit)
    expect_too_long = sum(1 for p in prompt if p >= limit)
    assert expect_truncated and expect_too_long  # the data exercises both paths

    prefix, summary = preprocess(tmp_path, records, "SentencePieceTokenizer", sp_model,
                                 "--system_key", "system", "--max_seq_length", str(limit),
                                 "--overlong", "truncate")
    meta = json.loads(Path(f"{prefix}-meta.json").read_text())
    assert meta == summary.meta
    identity = meta["tokenizer"]
    assert identity["type"] == "SentencePieceTokenizer" and identity["vocab_size"] == 1507
    assert identity["special_tokens"]["<|im_end|>"] == 1506 and len(identity["sha256"]) == 64
    assert meta["chat_format"]["name"] == "chatml" and meta["chat_format"]["stop_token"] == "<|im_end|>"
    assert meta["keys"] == {"question": "question", "answer": "answer", "system": "system",
                            "messages": None, "context": None}
    assert meta["inputs"] == [{"path": str(tmp_path / "out.jsonl"),
                               "bytes": (tmp_path / "out.jsonl").stat().st_size}]
    counts = meta["counts"]
    rows = read(prefix)
    assert counts["records_in"] == 26
    assert counts["rejected_by_reason"] == {"malformed_json": 1, "too_long": expect_too_long}
    assert counts["rejected"] == 1 + expect_too_long
    assert counts["records_out"] == len(rows) == 25 - expect_too_long
    assert counts["truncated"] == expect_truncated
    lengths = [len(t) for t, _ in rows]
    assert meta["tokens"]["total"] == sum(lengths)
    assert meta["tokens"]["assistant"] == sum(int((r == 2).sum()) for _, r in rows)
    assert meta["tokens"]["user"] == sum(int((r == 1).sum()) for _, r in rows)
    assert meta["lengths"]["max"] == max(lengths) == limit and meta["lengths"]["min"] == min(lengths)
    assert meta["lengths"]["p50"] == int(np.percentile(lengths, 50, method="inverted_cdf"))
    assert meta["lengths"]["p90"] == int(np.percentile(lengths, 90, method="inverted_cdf"))
    assert meta["lengths"]["mean"] == round(float(np.mean(lengths)), 2)
    assert meta["dtypes"] == {"text": "uint16", "role": "uint8"}
    assert meta["roles"] == {"system": 0, "user": 1, "assistant": 2}


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_writer_bytes_equal_megatron_core_builder(tmp_path, dtype):
    """Our chunked writer produces exactly megatron-core's IndexedDatasetBuilder files."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ext.data.indexed import ChunkedIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    records = [rng.integers(0, 200, size=int(n)) for n in rng.integers(1, 50, size=40)]
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for record in records:
        reference.add_item(torch.tensor(record))
        reference.end_document()
    reference.finalize(str(tmp_path / "ref.idx"))

    ours = ChunkedIndexedDatasetBuilder(str(tmp_path / "ours.bin"), dtype)
    for chunk in (records[:7], records[7:8], records[8:]):  # several chunks
        ours.add_records(np.concatenate(chunk), np.array([len(r) for r in chunk]))
    ours.finalize(str(tmp_path / "ours.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert all(np.array_equal(dataset[i], r) for i, r in enumerate(records))


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, sp_model, monkeypatch):
    """A worker killed mid-run (say by the OOM killer) stops the run with a clear error."""
    import os

    from megatron_ext.data.encode import Encoder
    from megatron_ext.errors import DataError

    original = Encoder.encode_chunk

    def dying(self, chunk):
        if chunk.first_line > 1:
            os._exit(9)  # in the forked worker only
        return original(self, chunk)

    monkeypatch.setattr(Encoder, "encode_chunk", dying)
    with pytest.raises(DataError, match="worker process died"):
        preprocess(tmp_path, qa_records(40), "SentencePieceTokenizer", sp_model,
                   "--workers", "2", "--chunk_size", "10")
    assert not list(tmp_path.glob("out-*"))  # nothing published, no temporaries left
