"""Reading preprocessed data back, data order across epochs, and batch collation."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ext.data.collate import collate, padded_width
from megatron_ext.data.instruction_dataset import InstructionDataset
from megatron_ext.data.sampling import EpochOrder, micro_batch_records
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
from tests.conftest import CHATML, qa_records
from tests.data.test_preprocess import preprocess


def sample(tokens, roles):
    return np.array(tokens, dtype=np.int64), np.array(roles, dtype=np.uint8)


def test_dataset_reads_what_the_preprocessor_wrote(tmp_path, sp_model):
    prefix, summary = preprocess(tmp_path, qa_records(20), "SentencePieceTokenizer", sp_model,
                                 "--system_key", "system")
    data = InstructionDataset(str(prefix))
    assert len(data) == 20 and int(data.lengths.sum()) == summary.meta["tokens"]["total"]
    tokens, roles = data[3]
    assert tokens.dtype == np.int64 and len(tokens) == len(roles) and roles[-1] == 2
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML))
    data.check_tokenizer(tok.identity())
    other = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML + ("<x>",)))
    with pytest.raises(DataError, match="different tokenizer.*vocab_size"):
        data.check_tokenizer(other.identity())


def test_dataset_accepts_megatron_llm_files_without_document_index(tmp_path, sp_model):
    """Megatron-LLM's preprocessor never calls end_document: its .idx has doc index [0]."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    records = [sample([5, 6, 7], [1, 2, 2]), sample([8, 9], [1, 2]), sample([1, 2, 3, 4], [0, 1, 2, 2])]
    for stream, column in (("text", 0), ("role", 1)):
        builder = IndexedDatasetBuilder(str(tmp_path / f"old-{stream}.bin"), dtype=np.uint16)
        for record in records:
            builder.add_item(torch.tensor(record[column].astype(np.int64)))
        builder.finalize(str(tmp_path / f"old-{stream}.idx"))
    data = InstructionDataset(str(tmp_path / "old"))
    assert data.meta is None and len(data) == 3
    assert data[2][0].tolist() == [1, 2, 3, 4] and data[2][1].tolist() == [0, 1, 2, 2]


def test_dataset_errors(tmp_path, sp_model):
    with pytest.raises(DataError, match="incomplete.*missing.*preprocess_instruct_data"):
        InstructionDataset(str(tmp_path / "nothing"))
    a, _ = preprocess(tmp_path, qa_records(5), "SentencePieceTokenizer", sp_model, name="a")
    b, _ = preprocess(tmp_path, qa_records(6), "SentencePieceTokenizer", sp_model, name="b")
    (tmp_path / "a-role.bin").write_bytes((tmp_path / "b-role.bin").read_bytes())
    (tmp_path / "a-role.idx").write_bytes((tmp_path / "b-role.idx").read_bytes())
    with pytest.raises(DataError, match="do not match"):
        InstructionDataset(str(a))


def test_epoch_order_is_deterministic_and_covers_every_record_each_epoch():
    order = EpochOrder(10, seed=7)
    first = order.records(0, 30)
    assert first.tolist() == EpochOrder(10, seed=7).records(0, 30).tolist()
    for epoch in range(3):
        assert sorted(first[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert first[:10].tolist() != first[10:20].tolist()  # reshuffled per epoch
    # any window (a resumed run) gives the same records as the whole run
    assert order.records(13, 9).tolist() == first[13:22].tolist()
    assert EpochOrder(10, seed=8).records(0, 10).tolist() != first[:10].tolist()
    assert EpochOrder(4, seed=1, shuffle=False).records(2, 4).tolist() == [2, 3, 0, 1]


def test_epochs_as_steps_over_records():
    from megatron_ext.training.config import ScheduleArgs
    from megatron_ext.training.data import SplitData, _Part, iterations

    split = SplitData("train", [_Part(None, 0, 10, 1.0)], seed=1)
    assert iterations(ScheduleArgs(epochs=2, global_batch_size=4), split) == 5
    assert iterations(ScheduleArgs(epochs=1, global_batch_size=3), split) == 4
    assert iterations(ScheduleArgs(train_iters=7, global_batch_size=3), split) == 7


def test_micro_batches_partition_the_global_batch():
    global_records = np.arange(16)
    parts = [micro_batch_records(global_records, rank, 2, 2) for rank in range(2)]
    assert [p.tolist() for p in parts[0]] == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert [p.tolist() for p in parts[1]] == [[2, 3], [6, 7], [10, 11], [14, 15]]
    merged = sorted(int(x) for rank in parts for mb in rank for x in mb)
    assert merged == list(range(16))
    with pytest.raises(ConfigError, match="not divisible"):
        micro_batch_records(np.arange(6), 0, 2, 2)


def test_collate_shifts_weights_by_the_predicted_token_role():
    row = sample([10, 11, 12, 13, 14, 15], [0, 1, 1, 2, 2, 2])
    batch = collate([[row]], seq_length=8, pad_id=0, scalar_loss_mask=0.25)
    assert batch.tokens[0].tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert batch.labels[0].tolist() == [11, 12, 13, 14, 15, 0, 0, 0]
    assert batch.loss_weights[0].tolist() == [0.25, 0.25, 1, 1, 1, 0, 0, 0]
    assert batch.segment_ids[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch.real_tokens == 5 and batch.total_weight == 3.5
    masked = collate([[row]], seq_length=8, pad_id=0)
    assert masked.loss_weights[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


def test_variable_seq_lengths_pad_to_a_multiple_of_16_capped_at_seq_length():
    short = sample(list(range(1, 11)), [1] * 5 + [2] * 5)  # 9 positions
    longer = sample(list(range(1, 22)), [1] * 10 + [2] * 11)  # 20 positions
    assert collate([[short]], 64, 0, variable_seq_lengths=True).tokens.shape == (1, 16)
    assert collate([[short], [longer]], 64, 0, variable_seq_lengths=True).tokens.shape == (2, 32)
    assert collate([[short], [longer]], 24, 0, variable_seq_lengths=True).tokens.shape == (2, 24)
    assert collate([[short]], 64, 0).tokens.shape == (1, 64)
    assert padded_width(16, 64, True) == 16 and padded_width(17, 64, True) == 32
    # a sample longer than seq_length is cut to seq_length positions
    cut = collate([[longer]], 8, 0, variable_seq_lengths=True)
    assert cut.tokens[0].tolist() == list(range(1, 9)) and cut.labels[0].tolist() == list(range(2, 10))


def test_packed_rows_restart_positions_and_number_segments():
    a = sample([1, 2, 3], [1, 2, 2])
    b = sample([4, 5, 6, 7], [1, 1, 2, 2])
    batch = collate([[a, b], [b]], seq_length=8, pad_id=0)
    assert batch.tokens[0].tolist() == [1, 2, 4, 5, 6, 0, 0, 0]
    assert batch.labels[0].tolist() == [2, 3, 5, 6, 7, 0, 0, 0]
    assert batch.position_ids[0, :5].tolist() == [0, 1, 0, 1, 2]
    assert batch.segment_ids[0].tolist() == [1, 1, 2, 2, 2, 0, 0, 0]
    assert batch.loss_weights[0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
    assert batch.segment_ids[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_split_ranges_and_weighted_blending(tmp_path, sp_model):
    from megatron_ext.training.config import DataArgs
    from megatron_ext.training.data import build_splits, parse_weighted_prefixes, split_ranges

    assert split_ranges(100, "98,1,1") == [(0, 98), (98, 99), (99, 100)]
    assert split_ranges(10, "80,20") == [(0, 8), (8, 10), (10, 10)]
    assert parse_weighted_prefixes(("3", "a", "1", "b"), "--data_path") == [(0.75, "a"), (0.25, "b")]
    with pytest.raises(ConfigError, match="weight"):
        parse_weighted_prefixes(("a", "b"), "--data_path")

    a, _ = preprocess(tmp_path, qa_records(30, seed=1), "SentencePieceTokenizer", sp_model, name="a")
    b, _ = preprocess(tmp_path, qa_records(20, seed=2), "SentencePieceTokenizer", sp_model, name="b")
    splits = build_splits(DataArgs(data_path=("0.75", str(a), "0.25", str(b)), split="90,10,0"), 7)
    train = splits["train"]
    assert len(train) == 27 + 18 and len(splits["valid"]) == 3 + 2 and splits["test"] is None
    chosen = train.records(0, 400)
    share_a = sum(1 for ds, _ in chosen if ds.prefix == str(a)) / 400
    assert share_a == pytest.approx(0.75, abs=0.01)
    assert all(index < 27 for ds, index in chosen if ds.prefix == str(a))  # train range only
    again = build_splits(DataArgs(data_path=("0.75", str(a), "0.25", str(b)), split="90,10,0"), 7)
    assert [(d.prefix, i) for d, i in again["train"].records(100, 50)] == \
        [(d.prefix, i) for d, i in chosen[100:150]]
