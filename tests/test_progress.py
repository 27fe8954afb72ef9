"""Progress on a terminal is a tqdm bar; in a log file (stderr not a terminal) it is plain
log lines with elapsed time and ETA, never a ``\\r``; the trainer's log line has both."""

from __future__ import annotations

import io
import logging

import pytest

from megatron_ext.cli import ProgressBar, elapsed_eta
from tests.conftest import CHATML, qa_records, write_jsonl


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_elapsed_and_eta_at_the_rate_so_far():
    assert elapsed_eta(10.0, 5, 10) == "elapsed 00:10 | ETA 00:10"
    assert elapsed_eta(3725.0, 1, 2) == "elapsed 1:02:05 | ETA 1:02:05"
    assert elapsed_eta(4.0, 0, 10) == "elapsed 00:04 | ETA ?"  # no step done yet
    assert elapsed_eta(4.0, 3, None) == "elapsed 00:04"  # no total, no ETA


def test_not_on_a_terminal_plain_lines_with_eta_and_no_carriage_return(caplog):
    stream = io.StringIO()
    caplog.set_level(logging.INFO)
    with ProgressBar(total=4, desc="generating", unit="prompt", every=0, stream=stream) as bar:
        for _ in range(4):
            bar.update(1)
    assert stream.getvalue() == ""  # tqdm drew nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[-1].startswith("generating: 4/4 prompt (100%) | elapsed ")
    assert "ETA" in lines[1] and "\r" not in "".join(lines)


def test_not_on_a_terminal_one_line_at_the_end_when_quick(caplog):
    caplog.set_level(logging.INFO)
    bar = ProgressBar(total=3, desc="exporting layers", unit="layer", stream=io.StringIO())
    assert list(bar.wrap(range(3))) == [0, 1, 2]  # wrap closes the bar
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == [
        "exporting layers: 3/3 layer (100%)"]


def test_on_a_terminal_a_tqdm_bar_and_no_log_line(caplog):
    stream = Terminal()
    caplog.set_level(logging.INFO)
    with ProgressBar(total=3, desc="training", unit="step", every=0, stream=stream) as bar:
        bar.update(3)
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()
    assert not caplog.records


def test_disabled_shows_nothing(caplog):
    stream = Terminal()
    caplog.set_level(logging.INFO)
    with ProgressBar(total=3, enabled=False, every=0, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and not caplog.records


def test_the_trainers_log_line_has_elapsed_and_eta_of_this_launch():
    from megatron_ext.training.trainer import train_log_line

    values = {"consumed_samples": 56, "consumed_tokens": 5000, "lr": 1e-4, "loss_avg": 2.5,
              "grad_norm": 1.0, "iter_time": 15.0, "tokens_per_sec": 40.0,
              "real_tokens_per_sec": 30.0, "padding_fraction": 0.25, "memory_mb": 100.0}
    # resumed at iteration 5: 2 steps in 30 s, 3 left -> 45 s
    line = train_log_line(7, 10, values, 30.0, 5)
    assert line.startswith("iter 7/10 | samples 56 | tokens 5000 | lr 0.0001 | loss 2.50000")
    assert line.endswith("| mem 100 MB | elapsed 00:30 | ETA 00:45")
    # the step's samples (rows) and the records in them (more when packed)
    line = train_log_line(7, 10, {**values, "rows": 8, "records": 23}, 30.0, 5)
    assert "| pad 25.0% | 8 rows, 23 records | mem 100 MB |" in line


def test_a_tool_run_into_a_log_file_writes_no_carriage_return(tmp_path, sp_model, capsys,
                                                                 caplog):
    """The HF import in-process with its progress on and stderr captured (not a terminal):
    plain lines, where tqdm used to write its bar's redraws."""
    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
    from tests.tools.conftest import make_hf_model

    caplog.set_level(logging.INFO)
    model = make_hf_model(tmp_path / "hf", sp_model, num_hidden_layers=2)
    capsys.readouterr()  # transformers' own bar, as it saved the model
    import_hf(ImportConfig(str(model), str(tmp_path / "ckpt"), progress=True))
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    assert any(r.getMessage().startswith("converting layers: 2/2 layer (100%) | elapsed ")
               for r in caplog.records)


def test_tokenization_shows_its_progress_in_a_log_file(tmp_path, sp_model, capsys, caplog):
    """The preprocessor (as the launcher runs it, in-process) with a few records: a line
    with bytes done, elapsed and ETA at the end (it used to print one per 10,000 records
    only, so a small or medium set showed nothing until done)."""
    from instruct.preprocess_instruct_data import build_parser, config_from_args
    from megatron_ext.data.preprocess import run_preprocess

    caplog.set_level(logging.INFO)
    source = write_jsonl(tmp_path / "train.jsonl", qa_records(20))
    run_preprocess(config_from_args(build_parser().parse_args([
        "--workers", "1", "--input", str(source), "--output_prefix", str(tmp_path / "out"),
        "--tokenizer_type", "SentencePieceTokenizer", "--vocab_file", sp_model,
        "--question_key", "question", "--answer_key", "answer",
        "--vocab_extra_ids_list", ",".join(CHATML)])))
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocess:")]
    assert lines and "(100%) | elapsed" in lines[-1] and "| records 20 " in lines[-1] + " "


@pytest.mark.parametrize("unit_scale, text", [(False, "7 B"), (True, "7.00 B")])
def test_amounts_without_a_total(unit_scale, text, caplog):
    caplog.set_level(logging.INFO)
    with ProgressBar(unit="B", unit_scale=unit_scale, stream=io.StringIO()) as bar:
        bar.update(7)
    assert caplog.records[-1].getMessage().startswith(text + " | elapsed ")
