"""The end of an experiment: the baseline evaluated once, ``--export``'s choices, the loss
plot and the summary; in-process, the tools mocked, nothing trained."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from megatron_ext.data.records import RecordKeys
from megatron_ext.errors import ConfigError
from tests.conftest import SAMPLE
from tests.launch.test_sft_options import parse


def metrics_file(path: Path) -> Path:
    rows = [{"iteration": i, "split": "train", "loss": 3.0 - 0.2 * i, "iter_time": 1.5}
            for i in range(1, 7)]
    rows += [{"iteration": 3, "split": "valid", "loss": 2.6, "ppl": 13.5},
             {"iteration": 6, "split": "valid", "loss": 2.2, "ppl": 9.0},
             {"iteration": 6, "split": "test", "loss": 2.3, "ppl": 10.0}]
    # a resumed run logs iteration 6 again: the last record counts
    rows.append({"iteration": 6, "split": "train", "loss": 1.75, "iter_time": 1.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 7, "spl')
    return path


def test_losses_from_metrics_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_ext.launch.report import plot_losses, read_losses, train_seconds

    metrics = metrics_file(tmp_path / "metrics.jsonl")
    losses = read_losses(str(metrics))
    assert [i for i, _ in losses["train"]] == [1, 2, 3, 4, 5, 6]
    assert losses["train"][-1] == (6, 1.75) and losses["valid"] == [(3, 2.6), (6, 2.2)]
    assert train_seconds(str(metrics)) == pytest.approx(9.0)
    (tmp_path / "exp").mkdir()
    out = plot_losses(str(metrics), str(tmp_path / "exp" / "loss.png"))
    data = Path(out).read_bytes()
    assert out == str(tmp_path / "exp" / "loss.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (700, 420)  # width, height
    assert plot_losses(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png")) is None


def test_the_summary_puts_baseline_and_finetuned_side_by_side(tmp_path):
    from megatron_ext.launch.report import finished_text

    root = tmp_path / "exp"
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/cache/.imported/m-1.hf"}))
    results = {
        "iteration": 6, "seconds": 3725.0, "train_seconds": 9.0, "train_loss": 1.75,
        "valid_loss": 2.2, "hf": str(root / "hf"), "adapter": str(root / "adapter"),
        "loss_png": str(root / "loss.png"), "tensorboard": str(root / "tensorboard"),
        "baseline": {"records": 6, "answer_loss": 4.56789, "answer_perplexity": 96.3,
                     "exact_match": 0.0, "f1": 0.125},
        "test": {"records": 6, "answer_loss": 1.23456, "answer_perplexity": 3.44,
                 "exact_match": 0.5, "f1": 0.6}}
    text = finished_text(str(root), results, already=False)
    lines = text.splitlines()
    assert lines[0] == f"experiment exp is finished: 6 steps ({root})"
    assert lines[1].split() == ["test", "split", "(6", "records)", "pretrained", "finetuned"]
    assert lines[2].split() == ["answer", "loss", "4.5679", "1.2346"]
    assert lines[3].split() == ["answer", "perplexity", "96.30", "3.44"]
    assert lines[4].split() == ["exact", "match", "0.0%", "50.0%"]
    assert lines[5].split() == ["token", "F1", "12.5%", "60.0%"]
    assert "  final loss: train 1.7500, validation 2.2000" in lines
    assert "  time: 1:02:05 from the first launch to the end (training 9.0 s)" in lines
    assert f"  Hugging Face model: {root / 'hf'}" in lines
    assert f"  PEFT adapter: {root / 'adapter'}" in lines
    assert "    base: /cache/.imported/m-1.hf" in lines  # how to load it, said where it is
    assert (f"    load: peft.AutoPeftModelForCausalLM.from_pretrained('{root / 'adapter'}') "
            "(the base") in text
    assert f"  loss curve: {root / 'loss.png'}" in lines
    assert f"  TensorBoard: tensorboard --logdir {root / 'tensorboard'}" in lines
    assert f"  folder: {root} (3.0 MB)" in lines
    # no baseline (--no_baseline): the finetuned column alone
    alone = finished_text(str(root), {**results, "baseline": None}, already=True)
    assert " pretrained " not in alone and alone.splitlines()[1].split()[-1] == "finetuned"
    assert alone.splitlines()[-1] == "  (--restart trains it again from the start)"


@pytest.fixture
def finish(tmp_path, monkeypatch):
    """``recipe._finish`` of a config, the tools it runs recorded instead of run."""
    import megatron_ext.launch.recipe as recipe
    from megatron_ext.launch.dataset import find_splits
    from megatron_ext.launch.experiment import open_experiment
    ran: list[list[str]] = []

    def run_in_process(command, log):
        ran.append(list(command))
        return 0

    monkeypatch.setattr(recipe, "run_in_process", run_in_process)

    def go(*argv: str, baseline=("--load", "BASE", "--chat_format", "chatml")):
        config = parse("-E", "exp", "--dataset_path", str(SAMPLE), "--hf_model_id", "m",
                       "--experiments_dir", str(tmp_path), *argv)
        config.validate()
        exp = open_experiment(str(tmp_path / "exp"), config.identity())
        ran.clear()
        outcome = recipe._finish(config, exp, find_splits(str(SAMPLE)), SAMPLE_KEYS,
                                 recipe._evaluation(config, _Base(), "chatml")
                                 if baseline else ())
        return outcome, [" ".join(c[1:]) for c in ran]

    return go


SAMPLE_KEYS = RecordKeys("question", "answer", "system")  # the bundled sample's


class _Base:
    imported, source, extra_ids = "BASE", "m", None


def _exports(commands: list[str]) -> set[str]:
    return {("adapter" if "--adapter_only" in c else "merged") for c in commands
            if "megatron_to_hf.py" in c}


@pytest.mark.parametrize("argv, exports", [
    (("--peft", "lora"), {"merged", "adapter"}),  # default: both
    (("--peft", "lora", "--export", "both"), {"merged", "adapter"}),
    (("--peft", "lora", "--export", "merged"), {"merged"}),
    (("--peft", "lora", "--export", "adapter"), {"adapter"}),
    ((), {"merged"}),  # full finetuning: the model only
    (("--export", "merged"), {"merged"}),
])
def test_export_choices(finish, argv, exports):
    outcome, commands = finish(*argv)
    assert _exports(commands) == exports
    results = outcome.experiment.results
    assert ("hf" in results) == ("merged" in exports)
    assert ("adapter" in results) == ("adapter" in exports)


def test_full_finetuning_has_no_adapter_to_export():
    with pytest.raises(ConfigError, match="--export adapter needs --peft"):
        parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m", "--export",
              "adapter").validate()


def test_the_baseline_is_evaluated_once_per_experiment_and_skippable(finish, tmp_path):
    _, commands = finish("--peft", "lora")
    evaluations = [c for c in commands if "evaluate.py" in c]
    assert len(evaluations) == 2 and "--load BASE --chat_format chatml" in evaluations[0]
    assert "eval/baseline.json" in evaluations[0] and "eval/test.json" in evaluations[1]
    (tmp_path / "exp" / "eval").mkdir(parents=True)
    (tmp_path / "exp" / "eval" / "baseline.json").write_text(json.dumps({"answer_loss": 4.0}))
    outcome, commands = finish("--peft", "lora")  # a rerun: the baseline is kept, not redone
    assert [c for c in commands if "evaluate.py" in c] == [evaluations[1]]
    assert outcome.experiment.results["baseline"] == {"answer_loss": 4.0}
    _, commands = finish("--peft", "lora", "--no_baseline", baseline=False)
    assert len([c for c in commands if "evaluate.py" in c]) == 1
    assert "--max_new_tokens 64 " in evaluations[0] and "--max_new_tokens 64 " in evaluations[1]
    shutil.rmtree(tmp_path / "exp")  # another length is another experiment
    _, commands = finish("--peft", "lora", "--eval_max_new_tokens", "24")
    assert [c.count("--max_new_tokens 24 ") for c in commands if "evaluate.py" in c] == [1, 1]


def test_the_slurm_jobs_post_step_keeps_the_choices(tmp_path):
    from megatron_ext.launch.experiment import open_experiment
    from megatron_ext.launch.recipe import _launch

    def post(*argv):
        config = parse("-E", "exp", "--dataset_path", "d", "--hf_model_id", "m",
                       "--experiments_dir", str(tmp_path), *argv)
        exp = open_experiment(str(tmp_path / "exp"), config.identity())
        exp.prefixes, exp.train_iters = {"training": "t"}, 2
        return _launch(config, exp, _Base()).post_command

    assert "--no_baseline" not in post() and "--export" not in post()
    assert post("--no_baseline", "--peft", "lora", "--export", "adapter")[-3:] == (
        "--no_baseline", "--export", "adapter")
    assert post("--export_gguf", "q8_0")[-2:] == ("--export_gguf", "q8_0")


def test_export_gguf_adds_the_gguf_export_and_its_summary_lines(finish, tmp_path):
    outcome, commands = finish("--peft", "lora", "--export_gguf", "q8_0")
    [gguf] = [c for c in commands if "megatron_to_gguf.py" in c]
    path = str(tmp_path / "exp" / "gguf" / "model-q8_0.gguf")
    assert f"--out {path} --outtype q8_0 --force" in gguf
    assert outcome.experiment.results["gguf"] == path
    assert f"llama-cli -m {path} -cnv" in outcome.message
    assert "'FROM ./model-q8_0.gguf'" in outcome.message
    _, commands = finish("--peft", "lora")
    assert not [c for c in commands if "megatron_to_gguf.py" in c]  # only when asked


def test_the_dry_run_shows_the_baseline_evaluation(tmp_path):
    from megatron_ext.launch.recipe import run_sft
    from tests.launch.test_sft_options import model_config

    model = model_config(tmp_path / "model")
    text = run_sft(parse("-E", "plan", "--dataset_path", str(SAMPLE), "--hf_model_id",
                         str(model), "--experiments_dir",
                         str(tmp_path / "exps"), "--max_steps", "2", "--dry_run")).message
    assert "evaluate.py --load '<import>'" in text and "eval/baseline.json" in text
