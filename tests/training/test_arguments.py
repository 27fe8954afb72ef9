"""Argument errors stop before any work, with one message listing every problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.training.arguments import build_parser, config_from_args
from tests.conftest import REPO

BASE = ["--data_path", "x", "--vocab_file", "tok.model", "--train_iters", "1"]


def config(*extra):
    return config_from_args(build_parser().parse_args([*BASE, *extra]))


@pytest.mark.parametrize("extra, world, message", [
    (["--global_batch_size", "6", "--micro_batch_size", "4"], 1,
     "--global_batch_size 6 is not divisible by --micro_batch_size 4 x data parallel size 1"),
    (["--global_batch_size", "4", "--micro_batch_size", "1"], 8,
     "--global_batch_size 4 is not divisible by --micro_batch_size 1 x data parallel size 8"),
    (["--num_attention_heads", "6", "--tensor_model_parallel_size", "4"], 4,
     "--num_attention_heads 6 is not divisible by --tensor_model_parallel_size 4"),
    (["--num_attention_heads", "6", "--num_attention_heads_kv", "3",
      "--tensor_model_parallel_size", "2"], 2,
     "--num_attention_heads_kv 3 and --tensor_model_parallel_size 2: one must divide the other"),
    (["--num_attention_heads", "4", "--num_attention_heads_kv", "1", "--kv_channels", "3",
      "--tensor_model_parallel_size", "4"], 4,
     "projection's 18 rows (4 + 2 x 1 heads of 3) do not split over "
     "--tensor_model_parallel_size 4"),
    (["--parallel_attn_norms", "2"], 1, "--parallel_attn_norms=2: the llama2 family has no such "
                                        "setting"),
    (["--rope_scaling_factor", "8", "--rope_scaling_type", "linear"], 1,
     "--rope_scaling_type=linear: the llama2 family has no such setting"),
    (["--model_name", "mistral", "--sliding_window_pattern", "2", "--sliding_window_size", "0"],
     1, "--sliding_window_pattern 2 needs --sliding_window_size"),
    (["--num_layers", "3", "--pipeline_model_parallel_size", "2"], 2,
     "--num_layers 3 is not divisible by --pipeline_model_parallel_size 2"),
    (["--tensor_model_parallel_size", "2"], 3, "world size 3 is not divisible by TP 2 x PP 1"),
    (["--context_parallel_size", "2", "--tensor_model_parallel_size", "2"], 6,
     "world size 6 is not divisible by TP 2 x PP 1 x CP 2"),
    (["--context_parallel_size", "2", "--global_batch_size", "4"], 16,
     "--global_batch_size 4 is not divisible by --micro_batch_size 1 x data parallel size 8"),
    (["--context_parallel_size", "2", "--seq_length", "90"], 2,
     "rows are padded to a multiple of 4; --seq_length 90 is not one (use 88 or 92)"),
    (["--context_parallel_size", "2", "--seq_length", "90", "--variable_seq_lengths"], 2,
     "--seq_length 90 is not one"),
    (["--context_parallel_size", "4", "--seq_length", "6"], 4, "(use 8)"),
    (["--context_parallel_size", "2", "--tensor_model_parallel_size", "4", "--sequence_parallel",
      "--seq_length", "100"], 8, "each CP rank's share over TP 4 (--sequence_parallel), so rows "
                                 "are padded to a multiple of 8"),
    (["--tensor_model_parallel_size", "2", "--sequence_parallel", "--variable_seq_lengths",
      "--seq_length", "99"], 2,
     "--sequence_parallel: --seq_length 99 must be divisible by --tensor_model_parallel_size 2"),
    (["--context_parallel_size", "0"], 1, "--context_parallel_size must be >= 1"),
    (["--epochs", "2"], 1, "give exactly one of --train_iters and --epochs"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--save_interval", "5"], 1, "--save_interval needs --save"),
    (["--auto_resume"], 1, "--auto_resume needs --save"),
    (["--train_data_path", "y"], 1, "either --data_path or --train_data_path"),
    (["--use_checkpoint_args"], 1, "--use_checkpoint_args needs --load"),
    (["--micro_batch_size", "0"], 1, "--micro_batch_size must be positive, got 0"),
    (["--make_vocab_size_divisible_by", "0"], 1, "--make_vocab_size_divisible_by must be positive"),
    (["--num_attention_heads", "0"], 1, "--num_attention_heads must be positive"),
])
def test_inconsistent_arguments_are_refused(extra, world, message):
    with pytest.raises(ConfigError) as error:
        config(*extra).validate(world)
    assert message in str(error.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as error:
        config("--num_layers", "3", "--pipeline_model_parallel_size", "2", "--fp16", "--bf16",
               "--global_batch_size", "3", "--micro_batch_size", "2").validate(2, cuda=True)
    text = str(error.value)
    assert text.count("\n  - ") == 3


@pytest.mark.parametrize("flags", [["--bf16"], ["--fp16"], ["--use_distributed_optimizer"],
                                   ["--bf16", "--use_distributed_optimizer",
                                    "--overlap_grad_reduce", "--overlap_param_gather"]])
def test_mixed_precision_and_the_distributed_optimizer_are_accepted_on_cpu(flags):
    """Once refused without CUDA; megatron-core's optimizers now run on CPU (compat/)."""
    config(*flags).validate(1, cuda=True)
    config(*flags).validate(1, cuda=False)


def test_loss_scaling_and_overlap_flags_are_parsed_and_checked():
    c = config("--fp16", "--initial_loss_scale", "1024", "--min_loss_scale", "2",
               "--loss_scale_window", "10", "--hysteresis", "1", "--overlap_grad_reduce")
    assert (c.optim.initial_loss_scale, c.optim.min_loss_scale, c.optim.loss_scale_window,
            c.optim.hysteresis, c.optim.loss_scale) == (1024, 2, 10, 1, None)
    assert c.parallel.overlap_grad_reduce and not c.parallel.overlap_param_gather
    assert config("--fp16", "--loss_scale", "512").optim.loss_scale == 512
    with pytest.raises(ConfigError) as error:
        config("--overlap_param_gather", "--min_loss_scale", "8", "--initial_loss_scale",
               "4").validate(1, cuda=False)
    assert "add --use_distributed_optimizer" in str(error.value)
    assert "--min_loss_scale 8.0 must be positive and at most" in str(error.value)


def test_both_flag_spellings_and_typed_config():
    a = config("--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
               "--global-batch-size", "8", "--scalar-loss-mask", "0.5")
    b = config("--tensor_model_parallel_size", "2", "--micro_batch_size", "2",
               "--global_batch_size", "8", "--scalar_loss_mask", "0.5")
    assert a == b and a.parallel.tensor_model_parallel_size == 2 and a.data.scalar_loss_mask == 0.5
    a.validate(2)
    cp = config("--context-parallel-size", "2", "--tensor_model_parallel_size", "2",
                "--sequence_parallel", "--seq_length", "96")
    assert cp == config("--context_parallel_size", "2", "--tensor_model_parallel_size", "2",
                        "--sequence_parallel", "--seq_length", "96")
    assert cp.parallel.context_parallel_size == 2 and cp.parallel.sequence_multiple == 4
    cp.validate(4)


def test_cli_prints_one_clear_error_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), *BASE, "--num_layers", "3",
         "--pipeline_model_parallel_size", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: invalid arguments" in result.stderr and "--num_layers 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_mismatched_tokenizer_is_refused(tmp_path, train_data):
    """A dataset preprocessed with another tokenizer stops the run with a clear message."""
    from megatron_ext.data.instruction_dataset import InstructionDataset
    from megatron_ext.errors import DataError
    from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer

    other = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", train_data["vocab_file"], ()))
    with pytest.raises(DataError, match="different tokenizer"):
        InstructionDataset(train_data["prefix"]).check_tokenizer(other.identity())


@pytest.mark.parametrize("argv,tied", [
    ([], None),  # the family's default (resolved: untied for Llama, tied for GPT)
    (["--tie_embed_logits"], True), (["--tie-word-embeddings"], True),
    (["--untie_embeddings_and_output_weights"], False), (["--untie-embed-logits"], False),
])
def test_tied_embeddings_have_the_spellings_of_both_projects(argv, tied):
    from megatron_ext.models.config import ModelArgs
    from megatron_ext.training.arguments import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(
        ["--data_path", "d", "--vocab_file", "v", *argv, "--head_dim", "32"]))
    assert config.model.tie_embeddings is tied
    assert config.model.kv_channels == 32
    assert ModelArgs(model_name="gpt").resolved().tie_embeddings is True
    assert ModelArgs(model_name="llama2").resolved().tie_embeddings is False
    assert ModelArgs(model_name="llama2", tie_embeddings=True).resolved().tie_embeddings is True


# -- --load of a Hugging Face model: shape and tokenizer come from its import -----------------
def hf_dir(tmp_path):
    """What makes --load a model to import, as far as the flags are concerned."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    return str(tmp_path / "hf")


def test_load_of_a_hf_model_takes_shape_and_tokenizer_from_it(tmp_path, monkeypatch):
    from megatron_ext.training.arguments import parse_config

    hf = hf_dir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    no_tokenizer = ["--data_path", "x", "--train_iters", "1", "--global_batch_size", "2",
                    "--load", hf]
    # model flags that would not fit the layout are not checked: the import's shape counts
    config = parse_config([*no_tokenizer, "--num_layers", "3",
                           "--pipeline_model_parallel_size", "2"])
    assert config.checkpoint.imports_model and config.checkpoint.shape_from_load
    assert config.tokenizer.tokenizer_type is None  # resolved from the import by the trainer
    assert not config.checkpoint.finetune  # implied by the trainer, not spelled here
    explicit = parse_config([*no_tokenizer, "--tokenizer_type", "HFTokenizer"])
    assert explicit.tokenizer.tokenizer_type == "HFTokenizer"
    # with a --vocab_file, or without a model to import, the default type as before
    assert parse_config([*no_tokenizer, "--vocab_file", "t.model"]).tokenizer.tokenizer_type \
        == "SentencePieceTokenizer"
    assert config_from_args(build_parser().parse_args(BASE)).tokenizer.tokenizer_type \
        == "SentencePieceTokenizer"
    assert not config_from_args(build_parser().parse_args(
        [*BASE, "--load", str(tmp_path)])).checkpoint.imports_model
    gguf = config_from_args(build_parser().parse_args([*no_tokenizer[:-1], "m.gguf"]))
    assert gguf.checkpoint.imports_model and gguf.tokenizer.tokenizer_type is None
    with pytest.raises(ConfigError, match="--vocab_file is required"):
        parse_config(no_tokenizer[:-2])
    with pytest.raises(ConfigError, match=f"--save {hf} is the model --load imports from"):
        parse_config([*no_tokenizer, "--save", hf])


def test_hf_load_flags_are_checked_without_torch(tmp_path):
    from tests.test_cli import run_guarded

    result = run_guarded("finetune.py", "--data_path", "x", "--train_iters", "1", "--load",
                         hf_dir(tmp_path), "--bf16", "--fp16")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "--bf16 and --fp16 are exclusive" in output, output
    assert "imported before the flags were checked" not in output
    help_text = run_guarded("finetune.py", "--help").stdout
    assert "--import_cache_dir" in help_text and "Hugging Face model" in help_text
