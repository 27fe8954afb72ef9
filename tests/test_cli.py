"""Flags derived from config dataclasses (megatron_ext/cli.py), and the commands that use them:
every field reachable from its flag, objects built by keyword, no torch before the flags pass."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from megatron_ext.cli import (
    ConfigParser,
    _dest,
    _flag_fields,
    _tuple_item,
    build_config,
    internal,
    option,
)
from tests.conftest import REPO


@dataclass(frozen=True)
class Inner:
    count: Optional[int] = option(None, "how many")
    ratio: float = option(0.5, "a fraction")
    names: tuple[str, ...] = option((), "one or more names", aliases=("--name_list",))
    kind: str = option("a", "which kind", choices=("a", "b"))
    switch: bool = option(False, "turn it on")
    keep: bool = option(True, "drop it")


@dataclass(frozen=True)
class Outer:
    path: str = option(help="required, no default", names=("--input_path",), metavar="PATH")
    inner: Inner = dataclasses.field(default_factory=Inner)
    note: str = internal("set by the program")


def parser() -> ConfigParser:
    p = ConfigParser(prog="demo")
    p.add_config(Outer, "outer")
    p.add_config(Inner, "inner")
    return p


def test_types_switches_and_spellings_are_derived_from_the_fields():
    built = parser().parse_config(Outer, [
        "--input-path", "x", "--count", "3", "--ratio=0.25", "--name_list", "p", "q",
        "--kind", "b", "--switch", "--no-keep"])
    assert built == Outer(path="x", inner=Inner(count=3, ratio=0.25, names=("p", "q"),
                                                kind="b", switch=True, keep=False),
                          note="set by the program")
    assert isinstance(built.inner.names, tuple)
    assert parser().parse_config(Outer, ["--input_path", "x"]) == Outer("x", Inner(), "set by the program")


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --input_path"),
    (["--input_path", "x", "--count", "many"], "--count: invalid int value: 'many'"),
    (["--input_path", "x", "--kind", "c"], "--kind: invalid choice: 'c'"),
    (["--input_path", "x", "--keep"], "unrecognized arguments: --keep"),
])
def test_bad_flags_are_refused_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_each_default_once():
    text = " ".join(parser().format_help().split())
    assert "a fraction (default: 0.5)" in text and "which kind (default: a)" in text
    assert "--no_keep drop it" in text and "--input_path PATH required, no default" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_field_name_is_a_flag_once_per_parser():
    @dataclass
    class Clash:
        ratio: float = option(1.0)

    p = parser()
    with pytest.raises(TypeError, match="ratio"):
        p.add_config(Clash)
    with pytest.raises(TypeError, match="no flag field"):
        ConfigParser().add_config(Inner, overrides={"nothing": {"default": 1}})


def test_given_values_and_unknown_fields():
    args = parser().parse_args(["--input_path", "x"])
    assert build_config(Outer, args, note="n").note == "n"
    with pytest.raises(TypeError, match="no field"):
        build_config(Outer, args, nothing=1)
    with pytest.raises(TypeError, match="no flag"):
        build_config(Outer, ConfigParser().parse_args([]))


# -- every field of a real command reachable from its flag -------------------------------------

def non_default_argv(p: ConfigParser, configs) -> tuple[list[str], dict]:
    """Flags that set every flag field of ``configs`` to a value other than its default,
    and the values expected per (config, field)."""
    actions: dict = {}
    for action in p._actions:  # a field's own flag, not its negation (added after it)
        actions.setdefault(action.dest, action)
    argv, want = [], {}
    for cls in configs:
        for f, hint, _ in _flag_fields(cls):
            action = actions[_dest(f)]
            flag = action.option_strings[0]
            default = action.default
            if hint is bool:
                argv.append(flag)
                value: Any = not default
            elif action.choices:
                others = [c for c in action.choices if c != default]
                if not others:  # a single choice cannot differ; still check it arrives
                    others = list(action.choices)
                value = others[-1]
                argv += [flag, str(value)]
            elif _tuple_item(hint) is not None:
                value = ((0, 1) if _tuple_item(hint) is int
                         else (f"{f.name}-1", f"{f.name}-2"))
                argv += [flag, *map(str, value)]
            elif hint is int:
                value = (default or 0) + 7
                argv += [flag, str(value)]
            elif hint is float:
                value = (default or 0.0) + 0.375
                argv += [flag, repr(value)]
            else:
                value = f"{f.name}-value"
                argv += [flag, value]
            want[cls, f.name] = value
    return argv, want


def check_every_field(p: ConfigParser, configs, built_of) -> None:
    argv, want = non_default_argv(p, configs)
    args = p.parse_args(argv)
    for (cls, name), value in want.items():
        built = build_config(cls, args) if built_of is None else built_of(cls, args)
        assert getattr(built, name) == value, (cls.__name__, name)


def test_every_finetune_flag_sets_its_field():
    from megatron_ext.training.arguments import SECTIONS, build_parser, config_from_args
    from megatron_ext.training.config import TrainConfig

    sections = {f.type if isinstance(f.type, type) else typing.get_type_hints(TrainConfig)[f.name]:
                f.name for f in dataclasses.fields(TrainConfig)}
    configs = [cls for cls, _ in SECTIONS]
    assert set(configs) == set(sections)  # every part of TrainConfig has its flags
    check_every_field(build_parser(), configs,
                      lambda cls, args: getattr(config_from_args(args), sections[cls]))


def test_every_preprocessor_flag_sets_its_field():
    from instruct.preprocess_instruct_data import build_parser, config_from_args
    from megatron_ext.data.encode import EncodeConfig
    from megatron_ext.data.preprocess import PreprocessConfig
    from megatron_ext.data.records import RecordKeys
    from megatron_ext.tokenizers import TokenizerArgs

    p = build_parser()
    argv, want = non_default_argv(p, [PreprocessConfig, EncodeConfig, RecordKeys, TokenizerArgs])
    argv[argv.index("--tokenizer_type") + 1] = "HFTokenizer"
    argv[argv.index("--vocab_extra_ids_list") + 1] = "<a>,<b>"
    at = argv.index("--prompt_template")  # implies --chat_format template: checked apart
    template = argv[at:at + 2]
    del argv[at:at + 2]
    config = config_from_args(p.parse_args(argv))
    tok = config.encode.tokenizer
    assert (tok.tokenizer_type, tok.vocab_file, tok.extra_ids, tok.new_tokens) == (
        "HFTokenizer", "vocab_file-value", ("<a>", "<b>"), False)
    for (cls, name), value in want.items():
        part = {PreprocessConfig: config, EncodeConfig: config.encode,
                RecordKeys: config.encode.keys}.get(cls)
        if part is not None and name != "prompt_template":
            assert getattr(part, name) == value, (cls.__name__, name)
    template[1] = "U: {input}\\nA: {output}"
    templated = config_from_args(p.parse_args(argv + template))
    assert (templated.encode.chat_format, templated.encode.prompt_template) == (
        "template", "U: {input}\nA: {output}")


# -- the inverse: a config written back as the flags that parse to it -------------------------

@pytest.mark.parametrize("argv", [
    ["--input_path", "x"],
    ["--input_path=-dash", "--count", "-3", "--ratio=-0.25", "--name_list", "p", "q",
     "--kind", "b", "--switch", "--no-keep"],
    ["--input_path", "x y", "--ratio", "1e-07", "--names", "a b"],
])
def test_to_argv_parses_back_to_the_same_config(argv):
    p = parser()
    built = p.parse_config(Outer, argv)
    written = p.to_argv(built)
    assert p.parse_config(Outer, written) == built
    assert p.to_argv(p.parse_config(Outer, written)) == written  # one spelling per config


def test_to_argv_writes_only_what_differs_from_the_parsers_defaults():
    p = parser()
    assert p.to_argv(Outer("x")) == ["--input_path", "x"]  # required: always written
    assert p.to_argv(Outer("x", Inner(ratio=0.5, keep=False, names=("n",)))) == [
        "--input_path", "x", "--names", "n", "--no_keep"]
    overridden = ConfigParser()
    overridden.add_config(Inner, overrides={"kind": {"default": "b"}})
    assert overridden.to_argv(Inner()) == ["--kind", "a"]  # the parser's default, not the field's


@pytest.mark.parametrize("inner, message", [
    (Inner(ratio=None), "Inner.ratio = None"),
    (Inner(kind="c"), "not one of --kind's choices"),
])
def test_to_argv_refuses_what_no_flag_gives_back(inner, message):
    with pytest.raises(ValueError, match=message):
        parser().to_argv(Outer("x", inner))


def test_every_finetune_flag_written_back_parses_to_the_same_config():
    """finetune.py's parser and its inverse agree on every field (switches, negations such
    as --untie_embeddings_and_output_weights, tuples, choices, Optional)."""
    from megatron_ext.training.arguments import SECTIONS, build_parser, config_from_args

    p = build_parser()
    argv, _ = non_default_argv(p, [cls for cls, _ in SECTIONS])
    for config in (config_from_args(p.parse_args(argv)), config_from_args(p.parse_args(
            argv + ["--untie_embeddings_and_output_weights", "--disable_bias_linear"]))):
        written = p.to_argv(config)
        assert config_from_args(p.parse_args(written)) == config
    assert "--untie_embeddings_and_output_weights" in written
    assert "--disable_bias_linear" in written


# -- no torch before the flags pass ------------------------------------------------------------

GUARD = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "megatron"):
            raise ImportError(f"{name} imported before the flags were checked")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_guarded(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", GUARD, str(REPO / script), *argv], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)


TRAIN = ["--data_path", "x", "--vocab_file", "tok.model", "--train_iters", "1"]


@pytest.mark.parametrize("script, argv, code, message", [
    ("finetune.py", ["--help"], 0, "--use_checkpoint_args"),
    ("finetune.py", [*TRAIN, "--num_layerz", "2"], 2, "unrecognized arguments: --num_layerz"),
    ("finetune.py", [*TRAIN, "--lr", "fast"], 2, "--lr: invalid float value: 'fast'"),
    ("finetune.py", [*TRAIN, "--model_name", "llama4"], 2, "--model_name: invalid choice"),
    ("finetune.py", [*TRAIN, "--num_layers", "3", "--pipeline_model_parallel_size", "2",
                     "--bf16", "--fp16"], 1,
     "  - --num_layers 3 is not divisible by --pipeline_model_parallel_size 2\n"
     "  - --bf16 and --fp16 are exclusive"),
    ("instruct/preprocess_instruct_data.py", ["--help"], 0, "--no_new_tokens"),
    ("instruct/preprocess_instruct_data.py", ["--input", "a.jsonl", "--output_prefix", "o",
                                              "--tokenizer_type", "x", "--vocab_file", "v"], 1,
     "error: unknown --tokenizer_type 'x'"),
])
def test_help_and_argument_errors_come_back_without_torch(script, argv, code, message):
    result = run_guarded(script, *argv)
    output = result.stdout + result.stderr
    assert "imported before the flags were checked" not in output
    assert result.returncode == code, output[-2000:]
    assert message in output and "Traceback" not in output


# -- the checkpoint tools: hf_to_megatron, megatron_to_hf, checkpoint_util ----------------------

def tool_parser(script: str) -> ConfigParser:
    """``build_parser()`` of a tool, loaded by path (tools/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{script}", REPO / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("script, config, command", [
    ("hf_to_megatron.py", "ImportConfig", []),
    ("megatron_to_hf.py", "ExportConfig", []),
    ("checkpoint_util.py", "ReshardConfig", ["split"]),
])
def test_every_checkpoint_tool_flag_sets_its_field(script, config, command):
    from megatron_ext.checkpointing import options

    cls = getattr(options, config)
    p = tool_parser(script)
    argv, want = non_default_argv(p, [cls])
    built = build_config(cls, p.parse_args(command + argv))
    for (_, name), value in want.items():
        assert getattr(built, name) == value, name


def test_checkpoint_tool_flags_keep_their_megatron_spellings():
    from megatron_ext.checkpointing.options import ExportConfig, ImportConfig, ReshardConfig

    reshard = build_config(ReshardConfig, tool_parser("checkpoint_util.py").parse_args([
        "merge", "--load", "l", "--out", "o", "--no-optimizer", "--target_tensor_parallel_size",
        "4", "--target-pipeline-parallel-size", "2", "--max_shard_size", "500MB"]))
    assert reshard == ReshardConfig(load="l", out="o", include_optimizer=False, target_tp=4,
                                    target_pp=2, max_shard_bytes=500 * 2**20)
    imported = build_config(ImportConfig, tool_parser("hf_to_megatron.py").parse_args([
        "--model_path", "m", "--out", "o", "--no_progress", "--max-shard-size=3GB"]))
    assert imported == ImportConfig(model_path="m", out="o", progress=False,
                                    max_shard_bytes=3 * 2**30)
    exported = build_config(ExportConfig, tool_parser("megatron_to_hf.py").parse_args([
        "--load", "l", "--out", "o"]))
    assert exported == ExportConfig(load="l", out="o") and exported.max_shard_bytes == 5 * 2**30


def test_dtype_choices_are_the_importers_dtypes():
    from megatron_ext.checkpointing.hf_import import DTYPES
    from megatron_ext.checkpointing.options import DTYPE_CHOICES

    assert DTYPE_CHOICES == tuple(DTYPES)


# One child for every case: each tool runs in it by path, as from a shell, behind the NoTorch
# guard; the child reports (exit status, output) per case and whether torch ever got in.
GUARD_MANY = """
import contextlib, io, json, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "megatron"):
            raise ImportError(f"{name} imported before the flags were checked")
sys.meta_path.insert(0, NoTorch())
from megatron_ext.cli import run_cli
results = []
for script, *argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            namespace = runpy.run_path(script)  # not as __main__: run_cli is called below
            run_cli(namespace["main"])
        except SystemExit as stop:
            code = stop.code
        except BaseException as exc:
            code = f"{type(exc).__name__}: {exc}"
    results.append([code, out.getvalue()])
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""

TOOL_CASES = [
    ("tools/hf_to_megatron.py", ["--help"], 0, "or a .gguf file"),
    ("tools/hf_to_megatron.py", ["--model_path", "m", "--out", "o", "--dtype", "fp8"], 2,
     "--dtype: invalid choice: 'fp8'"),
    ("tools/hf_to_megatron.py", ["--model_path", "m", "--out", "o", "--max_shard_size", "2XB"],
     1, "error: --max_shard_size '2XB': use a size like 2GB or 500MB"),
    ("tools/megatron_to_hf.py", ["--help"], 0, "--no_progress"),
    ("tools/megatron_to_hf.py", ["--load", "l", "--out", "o", "--iteration", "last"], 2,
     "--iteration: invalid int value: 'last'"),
    ("tools/checkpoint_util.py", ["--help"], 0, "--target_tensor_parallel_size"),
    ("tools/checkpoint_util.py", ["merge", "--load", "l", "--out", "o", "--optimizer"], 2,
     "unrecognized arguments: --optimizer"),
    ("tools/checkpoint_util.py", ["join", "--load", "l", "--out", "o"], 2,
     "argument command: invalid choice: 'join'"),
]


def test_checkpoint_tools_answer_help_and_flag_errors_without_torch():
    import json

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cases = [[script, *argv] for script, argv, _, _ in TOOL_CASES]
    child = subprocess.run([sys.executable, "-c", GUARD_MANY, json.dumps(cases)], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["torch"] is False
    for (script, argv, code, message), (got, output) in zip(TOOL_CASES, report["results"]):
        assert "imported before the flags were checked" not in output, (script, argv, output)
        assert got == code and message in " ".join(output.split()), (script, argv, got,
                                                                    output[-2000:])
        assert "Traceback" not in output


@dataclass(frozen=True)
class Method:
    method: Optional[str] = option(None, "which method", choices=("lora", "dora"),
                                   presets=(("--use_method", "lora"),))
    rank: int = option(16, "its rank", aliases=("--r",))
    verbose: bool = option(True, "talk")


def test_a_preset_spelling_sets_its_field_and_writes_back_as_the_field():
    p = ConfigParser(prog="demo")
    p.add_config(Method)
    assert p.parse_config(Method, ["--use-method"]) == Method(method="lora")
    assert p.parse_config(Method, ["--use_method", "--method", "dora"]).method == "dora"
    assert p.parse_config(Method, []) == Method()
    assert p.to_argv(Method(method="lora")) == ["--method", "lora"]
    assert "the same as --method lora" in p.format_help()


def test_flag_name_is_the_fields_first_long_spelling():
    from megatron_ext.cli import flag_name

    assert [flag_name(Method, n) for n in ("method", "rank", "verbose")] == [
        "--method", "--rank", "--no_verbose"]
    assert flag_name(Outer, "path") == "--input_path"


def test_a_user_error_goes_to_the_error_file_a_parent_asked_for(tmp_path, monkeypatch, capsys):
    """Under the launcher every rank fails alike: the first writes the message where the
    launcher reads it, and none prints it (the launcher says it once)."""
    from megatron_ext.cli import ERROR_FILE, run_cli
    from megatron_ext.errors import ConfigError

    report = tmp_path / "train.error"
    monkeypatch.setenv(ERROR_FILE, str(report))
    for rank in (0, 1):
        def main(rank=rank):
            raise ConfigError(f"bad layout (rank {rank})")
        with pytest.raises(SystemExit) as stop:
            run_cli(main)
        assert stop.value.code == 1
    assert report.read_text() == "bad layout (rank 0)\n"
    assert "bad layout" not in capsys.readouterr().err
    monkeypatch.delenv(ERROR_FILE)
    with pytest.raises(SystemExit):
        run_cli(main)
    assert capsys.readouterr().err == "error: bad layout (rank 1)\n"
