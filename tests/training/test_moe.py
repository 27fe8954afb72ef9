"""Mixtures of experts on megatron-core (models/moe.py, the compat layer's MoE patches):
flags and layout checks in-process; training at EP=2 (alltoall and allgather dispatchers),
EP=2 x TP=2, DP=2, PP=2 and CP=2, unpacked and packed, equal to one process; an EP=2 checkpoint resumed at EP=1 and
at TP=2 on the same curve. Three shared batches (one per world size), 4 iterations each."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.errors import UserError
from megatron_ext.parallel import ModelShape, ParallelArgs
from megatron_ext.training.arguments import parse_config
from tests.runs import (
    job_logits,
    logits_job,
    model_args,
    run_many,
    start_runs,
    started,
    starts_early,
    train_metrics,
)

ITERS = 4
MOE = ["--model_name", "mixtral", "--num_experts", "4", "--moe_router_topk", "2",
       "--moe_ffn_hidden_size", "48", "--moe_aux_loss_coeff", "0.01",
       "--moe_z_loss_coeff", "0.001"]
EP2 = ["--expert_model_parallel_size", "2"]
PACKED = ["--pack_sequences"]
# name -> flags of the 2-process runs (beside MOE); each is compared with its serial run
PARALLEL = {
    "ep2": EP2 + ["--save_interval", "2"],  # its iteration-2 checkpoint is resumed later
    "ep2-packed-allgather": EP2 + PACKED + ["--moe_token_dispatcher_type", "allgather"],
    "dp2": [],
    # the experts whole on each rank, the layers or the sequence split
    "pp2": ["--pipeline_model_parallel_size", "2"],
    "cp2-packed": ["--context_parallel_size", "2"] + PACKED,
    # LoRA on attention and on every expert's linears, from the EP=2 run (before it in the
    # batch): DoRA on the experts' and attention's, at EP=2
    "dora-ep2": EP2 + ["--peft", "dora", "--lr", "1e-2"],
}
# the 4-process runs: EP=2 x TP=2 (megatron-core's MoE needs sequence parallelism with TP)
FOUR = {name: EP2 + ["--tensor_model_parallel_size", "2", "--sequence_parallel"] + flags
        for name, flags in (("ep2-tp2", []), ("ep2-tp2-packed", PACKED))}
SERIAL = {"ref": [], "ref-packed": PACKED}


def _reference(name: str) -> str:
    return "ref-packed" if "packed" in name else "ref"


def _argv(data, root: Path, name: str, flags) -> list[str]:
    argv = model_args(data, ITERS) + MOE + list(flags) + ["--save", str(root / name)]
    if "--peft" in flags:
        argv += ["--load", str(root / "ep2")]
    if "allgather" in name:  # it gathers equal shares: rows of --seq_length (the padding
        argv.remove("--variable_seq_lengths")  # is left out of the routing statistics)
    return argv


@starts_early("moe_runs")
def start_moe_runs(request):
    """The serial references (one 1-process batch), every 2-process run (one batch) and
    every 4-process one (one batch)."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("moe")
    data = request.getfixturevalue("train_data")
    serial = start_runs(1, [{"name": name, "argv": _argv(data, root, name, flags)}
                            for name, flags in SERIAL.items()], root / "serial", early=True)
    parallel = start_runs(2, [{"name": name, "argv": _argv(data, root, name, flags)}
                              for name, flags in PARALLEL.items()], root / "parallel",
                          early=True)
    four = start_runs(4, [{"name": name, "argv": _argv(data, root, name, flags)}
                          for name, flags in FOUR.items()], root / "four", early=True)
    return root, serial, parallel, four


@pytest.fixture(scope="module")
def moe_runs(request) -> Path:
    root, serial, parallel, four = started("moe_runs", request)
    results = {**parallel.wait(), **four.wait(), **serial.wait()}
    assert all(r.returncode == 0 for r in results.values()), {
        name: r.log[-3000:] for name, r in results.items() if r.returncode}
    return root


def _stopped_at(run: Path, iteration: int, copy: Path) -> Path:
    """A copy of ``run`` whose latest checkpoint is ``iteration`` (as if it had stopped)."""
    shutil.copytree(run, copy)
    for later in copy.glob("iter_*"):
        if int(later.name[len("iter_"):]) > iteration:
            shutil.rmtree(later)
    (copy / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return copy


TOKENS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resumed_runs(moe_runs, train_data) -> Path:
    """The EP=2 run's iteration-2 checkpoint resumed at EP=1 (one process, beside the EP=2
    run's final logits at EP=1) and at TP=2 with sequence parallelism (two)."""
    from megatron_ext.checkpointing.options import ReshardConfig
    from megatron_ext.checkpointing.reshard import merge

    root = moe_runs / "resumed"
    # the unsharded form (one tensor per expert, the chained optimizers' state) of it too
    merge(ReshardConfig(load=str(moe_runs / "ep2"), out=str(root / "merged"), iteration=2))
    layouts = {"ep1": (1, []), "tp2": (2, ["--tensor_model_parallel_size", "2",
                                            "--sequence_parallel"])}
    for name, (nproc, flags) in layouts.items():
        run = _stopped_at(moe_runs / "ep2", 2, root / name)
        jobs = [{"name": name, "argv": model_args(train_data, ITERS) + MOE + flags
                 + ["--load", str(run), "--save", str(run)]}]
        if nproc == 1:
            jobs += [logits_job(f"{run}-at-ep1", moe_runs / run, TOKENS, root / "logits")
                     for run in ("ep2", "dora-ep2")]
            jobs.insert(1, {"name": "merged", "argv": model_args(train_data, ITERS) + MOE + [
                "--load", str(root / "merged"), "--save", str(root / "from-merged")]})
        results = run_many(nproc, jobs, root / f"launch-{name}")
        for job in jobs:
            if "logits" in job:
                torch.save(job_logits(results, job), root / f"{job['name']}.pt")
            else:
                assert results[job["name"]].returncode == 0, results[job["name"]].log[-3000:]
    return root


def assert_same_curve(got, want, rtol=2e-5):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "load_balancing_loss", "z_loss"):
            assert g[key] == pytest.approx(w[key], rel=rtol), (key, g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), (g, w)
        assert g["consumed_tokens"] == w["consumed_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in PARALLEL if "--peft" not in PARALLEL[name]]
                         + list(FOUR))
def test_expert_and_data_parallel_training_matches_one_process(moe_runs, name):
    """Losses (the masked loss and the aux losses), grad norms: EP=2 starts from the
    experts EP=1 has (per-expert seeding) and routes every token (dropless)."""
    want = train_metrics(moe_runs / _reference(name))
    assert_same_curve(train_metrics(moe_runs / name), want)
    assert all(r["load_balancing_loss"] > 0 and r["z_loss"] > 0 for r in want)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep1", "tp2", "from-merged"])
def test_ep2_checkpoint_resumes_at_another_layout_on_the_same_curve(moe_runs, resumed_runs,
                                                                    layout):
    """At EP=1, at TP=2 with sequence parallelism, and at EP=1 from its unsharded merge."""
    got = train_metrics(resumed_runs / layout)
    if layout == "from-merged":  # a new --save: only the steps after the merged iteration
        got = [{"iteration": 1}, {"iteration": 2}, *got]
    want = train_metrics(moe_runs / "ref")
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    assert_same_curve(got[2:], want[2:])


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ep2", "dora-ep2"])
def test_ep2_checkpoint_exports_to_transformers_with_our_logits(moe_runs, resumed_runs,
                                                                 tmp_path, run):
    """The EP=2 run's final checkpoint (experts stacked in its shards), and the DoRA
    adapters trained on it at EP=2 merged in, exported as a Hugging Face Mixtral:
    transformers computes the logits our model computes at EP=1."""
    import transformers

    from megatron_ext.checkpointing.hf_export import export_hf
    from megatron_ext.checkpointing.options import ExportConfig

    export_hf(ExportConfig(load=str(moe_runs / run), out=str(tmp_path / "hf"),
                           progress=False))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    ours = torch.load(resumed_runs / f"{run}-at-ep1.pt")
    with torch.no_grad():
        theirs = model(TOKENS).logits
    assert (theirs - ours).abs().max() <= 1e-5 * theirs.abs().max()
    if run == "dora-ep2":  # the adapters moved the model; the base alone is elsewhere
        base = torch.load(resumed_runs / "ep2-at-ep1.pt")
        assert (theirs - base).abs().max() > 1e-3


@pytest.mark.slow
def test_expert_adapters_train_and_refuse_a_peft_export_clearly(moe_runs, tmp_path):
    """DoRA on the experts trained at EP=2 (each expert's adapters its own, every step
    finite and the loss going down); their PEFT export is refused by a message that says
    what to do (the merged export above works)."""
    from megatron_ext.checkpointing.hf_peft import export_adapter
    from megatron_ext.models.family import UnsupportedModelError

    curve = train_metrics(moe_runs / "dora-ep2")
    assert curve[-1]["loss"] < curve[0]["loss"]
    with pytest.raises(UnsupportedModelError, match="without --adapter_only"):
        export_adapter(str(moe_runs / "dora-ep2"), str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------ flags, layout checks
BASE = "--data_path x --vocab_file v --train_iters 2 --num_experts 4".split()


@pytest.mark.parametrize("flags,message", [
    (["--moe_router_topk", "5"], "--moe_router_topk 5 must be between 1 and --num_experts 4"),
    (["--expert_model_parallel_size", "3"], "--num_experts 4 is not divisible by "
                                            "--expert_model_parallel_size 3"),
    (["--tensor_model_parallel_size", "2"], "needs --sequence_parallel"),
    (["--expert_model_parallel_size", "2", "--moe_token_dispatcher_type", "allgather", "--variable_seq_lengths"],
     "drop --variable_seq_lengths, or use the alltoall dispatcher"),
])
def test_bad_moe_flags_are_clear_errors(flags, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        parse_config(BASE + flags)


def test_expert_parallel_layout_rules():
    shape = ModelShape.of(2, 4, 64, num_experts=4)
    ep2 = ParallelArgs(expert_model_parallel_size=2)
    assert ep2.problems(4, model=shape) == []
    assert "not divisible by TP 1 x PP 1 x EP 2" in " ".join(ep2.problems(3, model=shape))
    assert "not divisible by TP 2 x PP 1 x EP 2" in " ".join(ParallelArgs(
        tensor_model_parallel_size=2, expert_model_parallel_size=2).problems(2))
    dense = ModelShape.of(2, 4, 64)
    assert "the model has none" in " ".join(ep2.problems(2, model=dense))


def test_moe_flags_have_megatron_lm_names_and_dropless_default(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_config(BASE + ["--moe_aux_loss_coeff", "0.01", "--expert_model_parallel_size", "2", "--global_batch_size", "2",
                                  "--moe_token_dispatcher_type", "allgather"])
    assert config.model.num_experts == 4 and config.model.moe_router_topk == 2
    assert config.parallel.expert_model_parallel_size == 2
    assert config.moe.moe_aux_loss_coeff == 0.01
    assert config.moe.moe_token_dispatcher_type == "allgather"
    assert config.moe.moe_expert_capacity_factor is None  # dropless
    assert config.model.resolved().moe_ffn_hidden_size == config.model.resolved().ffn_hidden_size
