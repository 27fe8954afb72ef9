"""The parallel layout's rules, in one place (``ParallelArgs.problems``), as every command
that takes a layout sees them: the trainer, the launcher, inference and the reshard tool."""

from __future__ import annotations

import pytest

from megatron_ext.parallel import ModelShape, ParallelArgs

SHAPE = ModelShape.of(num_layers=4, num_attention_heads=8, hidden_size=64,
                      num_attention_heads_kv=2)


def layout(tp=1, pp=1, cp=1, sp=False) -> ParallelArgs:
    return ParallelArgs(tp, pp, cp, sp)


def test_a_layout_that_fits_has_no_problems():
    assert layout(2, 2, 2, sp=True).problems(16, micro_batch_size=2, global_batch_size=8,
                                             seq_length=64, model=SHAPE) == []
    assert layout().problems() == []  # nothing given, nothing to check


@pytest.mark.parametrize("args, given, message", [
    ((0, 1, 1), {}, "--context_parallel_size must be >= 1"),
    ((2, 1, 1), {"world_size": 3}, "world size 3 is not divisible by TP 2 x PP 1"),
    ((2, 1, 2), {"world_size": 6}, "world size 6 is not divisible by TP 2 x PP 1 x CP 2"),
    ((2, 1, 1), {"world_size": 3, "world": "1 node(s) x --num_gpus 3 = 3 processes are"},
     "3 processes are not divisible by TP 2 x PP 1 x CP 1"),
    ((1, 1, 1), {"world_size": 4, "micro_batch_size": 2, "global_batch_size": 4},
     "--global_batch_size 4 is not divisible by --micro_batch_size 2 x data parallel size 4"),
    ((1, 1, 1, True), {}, "--sequence_parallel splits the sequence over tensor-parallel ranks"),
    ((2, 1, 1, True), {"seq_length": 99},
     "--sequence_parallel: --seq_length 99 must be divisible by --tensor_model_parallel_size 2"),
    ((1, 1, 2), {"seq_length": 90}, "rows are padded to a multiple of 4; --seq_length 90 is not "
                                    "one (use 88 or 92)"),
    ((3, 1, 1), {"model": SHAPE}, "--num_attention_heads 8 is not divisible by "
                                  "--tensor_model_parallel_size 3"),
    ((4, 1, 1), {"model": ModelShape.of(4, 8, 64, 3)},
     "--num_attention_heads 8 is not divisible by --num_attention_heads_kv 3"),
    ((1, 3, 1), {"model": SHAPE}, "--num_layers 4 is not divisible by "
                                  "--pipeline_model_parallel_size 3"),
])
def test_each_rule_says_what_is_wrong(args, given, message):
    problems = layout(*args).problems(**given)
    assert any(message in problem for problem in problems), problems


def test_fewer_key_value_heads_than_tp_ranks_are_shared():
    assert layout(4).problems(4, model=SHAPE) == []  # 2 KV heads, each shared by 2 ranks


def test_the_trainer_and_the_launcher_state_the_same_rule_the_same_way():
    from megatron_ext.errors import ConfigError
    from megatron_ext.launch.options import SFTConfig
    from megatron_ext.training.arguments import build_parser, config_from_args

    rule = layout(1, 1, 2).problems(seq_length=1022)[0]
    train = config_from_args(build_parser().parse_args(
        ["--data_path", "x", "--vocab_file", "t", "--train_iters", "1", "--seq_length", "1022",
         "--context_parallel_size", "2", "--global_batch_size", "2"]))
    with pytest.raises(ConfigError) as trainer_error:
        train.validate(2)
    launch = SFTConfig(experiment="e", dataset_path="d", hf_model_id="m", num_gpus=2,
                       seq_length=1022, global_batch_size=2,
                       parallel=ParallelArgs(context_parallel_size=2))
    with pytest.raises(ConfigError) as launcher_error:
        launch.validate()
    assert rule in str(trainer_error.value) and rule in str(launcher_error.value)
