"""Mixture-of-experts families against transformers: routing token for token, weight names
both ways (on-disk per-expert names, transformers 5's stacked in-memory experts), an HF
import whose logits equal transformers' at TP=1 (one process) and at EP=2, TP=2 and PP=2
(one 2-process batch), the export back bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.models.families import get_family
from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.hf_moe import config_experts
from tests.runs import (
    call_job,
    job_logits,
    logits_job,
    start_runs,
    started,
    starts_early,
    tool_job,
)
from tests.tools.test_peft_export import run_args

# std 0.2: clear margins between the best two next tokens (greedy generation compared)
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             initializer_range=0.2)
PROMPTS = ([5, 17, 42, 7, 99], [3, 8])
NEW_TOKENS = 8
# family -> (transformers class prefix, its config's MoE fields)
MOE = {"mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                   rope_theta=1e6)),
       # transformers' default norm_topk_prob=False: the softmax's top-k weights as they are
       "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                      moe_intermediate_size=40, rms_norm_eps=1e-6,
                                      rope_theta=1e6, norm_topk_prob=False)),
       # its first layer a dense MLP (mlp_only_layers; megatron-core's moe_layer_freq)
       "qwen3_moe-dense": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                            moe_intermediate_size=40, intermediate_size=56,
                                            rms_norm_eps=1e-6, rope_theta=1e6,
                                            norm_topk_prob=True, mlp_only_layers=[0]))}
MOE["olmoe"] = ("Olmoe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                              rope_theta=10000.0))
FAMILIES = ["mixtral", "qwen3_moe", "olmoe"]  # the variants beyond them: conversion only


def family_of(variant: str) -> str:
    return variant.split("-")[0]
LAYOUTS = {"ep2": dict(ep=2), "tp2": dict(tp=2), "pp2": dict(pp=2),
           "tp2ep2": dict(tp=2, ep=2)}  # (4 processes)
# what each family is checked at beyond one process (Qwen3-MoE's attention is Qwen3's,
# checked at TP=2 in test_hf_weights.py; its experts are what EP=2 splits)
PARALLEL = {"mixtral": ("ep2", "tp2", "pp2", "tp2ep2"), "qwen3_moe": ("ep2", "pp2", "tp2ep2"),
            "qwen3_moe-dense": ("ep2",),
            "olmoe": ("ep2", "tp2", "pp2", "tp2ep2")}  # TP: OLMoE's q/k norms span the ranks
CASES = [(family, layout) for family in MOE for layout in ("tp1", *PARALLEL[family])]
GENERATION = [("mixtral", "ep1"), ("mixtral", "tp2"), ("qwen3_moe", "ep1")]


def hf_moe_model(family: str, vocab: int = 300, **overrides):
    """A tiny random transformers model of ``family`` (its norms perturbed: transformers
    starts them at 1, where a wrong mapping goes unseen)."""
    import transformers

    kind, fields = MOE[family]
    config = getattr(transformers, f"{kind}Config")(**{**SHAPE, **fields, "vocab_size": vocab,
                                                       **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
    model.config._attn_implementation = "eager"
    return model.eval()


# ------------------------------------------------------------------ in-process
@pytest.mark.parametrize("family", FAMILIES)
def test_routing_equals_transformers_token_for_token(family):
    """megatron-core's router as the family configures it (builder.moe_config and the
    family's settings) against the transformers router on the same logits, ties and
    near-ties included: the same experts and weights for every token."""
    import copy

    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from megatron_ext.models.builder import moe_config
    from megatron_ext.models.config import ModelArgs, MoEArgs
    from megatron_ext.parallel import ParallelArgs

    model = hf_moe_model(family)
    experts = config_experts(model.config.to_dict(), "num_experts")
    config = copy.deepcopy(model.config)
    config.hidden_size = experts
    router = type(model.model.layers[0].mlp.gate)(config)  # its input is its logits
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
    logits = torch.randn(64, experts, generator=torch.Generator().manual_seed(5))
    logits[:4] = 0.5  # every expert tied
    logits[4:8, 1] = logits[4:8, 2] = logits[4:8].max(dim=-1).values  # two tied at the top
    logits[8:12, 3] = logits[8:12, 0] + 1e-7  # nearly tied
    with torch.no_grad():
        _, weights, chosen = router(logits)
    args = ModelArgs.from_dict(get_family(family).hf.model_args(
        model.config.to_dict(), family, "config.json")).resolved()
    settings = {**moe_config(args, ParallelArgs(), MoEArgs()),
                **args.settings.transformer_config(args)}
    probs, routing_map = topk_routing_with_score_function(
        logits, router.top_k, use_pre_softmax=settings.get("moe_router_pre_softmax", False),
        score_function="softmax")
    ours = routing_map.nonzero()[:, 1].view(-1, router.top_k)
    assert torch.equal(ours, chosen.sort(dim=-1).values)
    theirs = weights.gather(1, chosen.argsort(dim=-1))
    assert torch.allclose(probs.gather(1, ours), theirs.to(probs.dtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", list(MOE))
def test_weights_round_trip_on_disk_names_and_in_memory_layout(family, tmp_path):
    """HF (on-disk per-expert names) -> ours -> HF is bit-exact; transformers 5's in-memory
    stacked experts convert to the same tensors."""
    from safetensors.torch import load_file

    model = hf_moe_model(family)
    model.save_pretrained(tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    adapter = get_family(family_of(family)).hf.for_config(model.config.to_dict())
    for layer in range(SHAPE["num_hidden_layers"]):
        names = adapter.layer_names(layer)
        assert set(names) <= set(disk)  # the importer reads exactly what the Hub stores
        ours = adapter.layer_to_megatron({n: disk[n] for n in names}, layer, 4, 2)
        in_memory = {k: v for k, v in model.state_dict().items()
                     if k.startswith(f"model.layers.{layer}.")}
        assert _equal(adapter.layer_to_megatron(in_memory, layer, 4, 2), ours)
        back = adapter.layer_from_megatron(ours, layer, 4, 2)
        assert _equal(back, {n: disk[n] for n in names})


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moe_model_is_refused_by_a_dense_layout_and_a_dense_one_by_an_moe_layout():
    from megatron_ext.models.config import ModelArgs

    moe = ModelArgs(model_name="llama2", num_experts=4).resolved()
    with pytest.raises(UnsupportedModelError, match="mixture of 4 experts"):
        get_family("llama2").hf.hf_config(moe, 300, 1, 2, None, "float32")
    dense = ModelArgs(model_name="mixtral").resolved()
    assert dense.num_experts == 8  # the family's default
    assert get_family("mixtral").hf.hf_config(dense, 300, 1, 2, None, "float32")[
        "num_local_experts"] == 8


# ------------------------------------------------------------------ against transformers
TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@starts_early("moe_logits")
def start_moe_logits(request):
    """Each family imported here (in-process), then its logits at TP=1 (one process), at
    EP=2, TP=2 and PP=2 (one 2-process batch) and at TP=2 x EP=2 (one 4-process batch)."""
    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf

    root = request.getfixturevalue("tmp_path_factory").mktemp("moe_logits")
    sp_model = request.getfixturevalue("sp_model")
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=sp_model).get_piece_size()
    expected, serial, parallel, four = {}, [], [], []
    for family in MOE:
        model = hf_moe_model(family, vocab)
        hf_dir = root / f"{family}-hf"
        model.save_pretrained(hf_dir)
        (hf_dir / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
        with torch.no_grad():
            expected[family] = model(TOKENS).logits
        out = root / family
        import_hf(ImportConfig(model_path=str(hf_dir), out=str(out), progress=False))
        serial.append(logits_job(f"{family}-tp1", out, TOKENS, root / "logits"))
        for name in PARALLEL[family]:
            (four if name == "tp2ep2" else parallel).append(logits_job(
                f"{family}-{name}", out, TOKENS, root / "logits", **LAYOUTS[name]))
        with torch.no_grad():  # transformers' greedy continuations
            expected[f"{family}-greedy"] = [model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
                for prompt in PROMPTS]
        if family == "mixtral":
            # the trainer's command as the launcher writes it for this base: --load of the
            # Hugging Face directory itself (imported into a cache), at EP=2
            data = request.getfixturevalue("imported_train_data")
            parallel.append({"name": "mixtral-from-hf", "argv": run_args(
                data["prefix"], hf_dir, root / "from-hf", iters=2) + [
                "--auto_resume", "--use_checkpoint_args", "--import_cache_dir",
                str(root / "import-cache"), "--expert_model_parallel_size", "2"]})
            # tools/evaluate.py at EP=1 (one process) and TP=2 (two)
            qa = root / "qa.jsonl"
            qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                                  (("Hello world", "a reply"), ("numbers 12345", "42 is"))))
            for tp, batch in (("1", serial), ("2", parallel)):
                batch.append(tool_job(
                    f"mixtral-evaluate-tp{tp}", "evaluate.py", "--load", str(out), "--input",
                    str(qa), "--chat_format", "template", "--prompt_template",
                    "Q: {input}\nA: {output}", "--max_new_tokens", "4", "-T", tp,
                    "--summary_json", str(root / f"evaluate-tp{tp}.json"), "--output",
                    str(root / f"evaluate-tp{tp}.jsonl")))
        for name, layout in GENERATION:
            if name == family:
                (serial if layout == "ep1" else parallel).append(call_job(
                    f"{family}-generate-{layout}", f"{__name__}:greedy", str(out),
                    "1" if layout == "ep1" else "2"))
    return (root, expected, serial + parallel + four,
            [start_runs(1, serial, root / "serial", early=True),
             start_runs(2, parallel, root / "parallel", early=True),
             start_runs(4, four, root / "four", early=True)])


def greedy(load: str, tp: str) -> None:
    """A call_job: our greedy continuations of :data:`PROMPTS` (KV cache, batched) at TP
    ``tp``, printed as JSON on rank 0."""
    import torch.distributed as dist

    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.inference.loading import load_for_inference

    loaded = load_for_inference(load, int(tp))
    results = generate(loaded.model, [list(p) for p in PROMPTS],
                       SamplingParams(max_new_tokens=NEW_TOKENS), (),
                       loaded.tokenizer.vocab_size)
    if dist.get_rank() == 0:
        print(json.dumps([r.token_ids for r in results]))


@pytest.fixture(scope="module")
def moe_logits(request) -> dict:
    root, expected, jobs, launches = started("moe_logits", request)
    results = {name: result for launch in launches for name, result in launch.wait().items()}
    got = {job["name"]: job_logits(results, job) for job in jobs if "logits" in job}
    for job in jobs:
        if "call" in job:
            result = results[job["name"]]
            assert result.returncode == 0, result.log[-3000:]
            got[job["name"]] = json.loads(result.stdout.strip().splitlines()[-1])
    return expected, got, root


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", GENERATION)
def test_greedy_generation_equals_transformers(moe_logits, family, layout):
    expected, got, _ = moe_logits
    assert got[f"{family}-generate-{layout}"] == expected[f"{family}-greedy"]


@pytest.mark.slow
def test_the_launchers_trainer_command_trains_from_the_hf_directory(moe_logits):
    """``--load HF_DIR --auto_resume --use_checkpoint_args --import_cache_dir``, what
    ``sft.py`` runs for a Mixtral base: imported once, trained at EP=2, checkpointed."""
    from tests.runs import train_metrics

    root = moe_logits[2]
    metrics = train_metrics(root / "from-hf")
    assert [r["iteration"] for r in metrics] == [1, 2]
    model = json.loads((root / "from-hf" / "iter_0000002" / "run_config.json").read_text())[
        "model"]
    assert (model["model_name"], model["num_experts"]) == ("mixtral", 4)
    assert (root / "from-hf" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert list((root / "import-cache").iterdir())


@pytest.mark.slow
def test_evaluation_at_tp2_equals_one_process(moe_logits):
    """tools/evaluate.py on a Mixtral: the answer loss, the predictions and their scores at
    TP=2 are those of one process (whose logits equal transformers', above)."""
    root = moe_logits[2]
    one, two = (json.loads((root / f"evaluate-tp{tp}.json").read_text()) for tp in (1, 2))
    assert one["records"] == two["records"] == 2 and one["answer_tokens"] > 0
    assert two["answer_loss"] == pytest.approx(one["answer_loss"], rel=1e-5)
    assert (two["exact_match"], two["f1"]) == (one["exact_match"], one["f1"])
    rows = [[json.loads(line)["prediction"] for line in
             (root / f"evaluate-tp{tp}.jsonl").read_text().splitlines()] for tp in (1, 2)]
    assert rows[0] == rows[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MOE))
def test_hf_round_trip_is_bit_exact(moe_logits, family, tmp_path):
    """Imported, then exported: the Hub's per-expert tensors, bit for bit, and a config
    transformers reads as the same model."""
    from safetensors.torch import load_file

    from megatron_ext.checkpointing.hf_export import export_hf
    from megatron_ext.checkpointing.options import ExportConfig

    root = moe_logits[2]
    export_hf(ExportConfig(load=str(root / family), out=str(tmp_path / "out"), progress=False))
    original = load_file(root / f"{family}-hf" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert _equal(exported, original)
    theirs = json.loads((root / f"{family}-hf" / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("num_experts_per_tok", "norm_topk_prob", "head_dim", "intermediate_size",
                "moe_intermediate_size", "rope_theta", "rms_norm_eps", "mlp_only_layers",
                "decoder_sparse_step"):
        if theirs.get(key) is not None:
            assert ours[key] == theirs[key], key
    key = get_family(family_of(family)).hf.experts_key  # the Hub's name (transformers 5: both)
    assert config_experts(ours, key) == config_experts(theirs, key) == 4


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", CASES)
def test_imported_moe_model_reproduces_transformers_logits(moe_logits, family, layout):
    expected, got, _ = moe_logits
    want = expected[family]
    diff = (got[f"{family}-{layout}"] - want).abs().max().item()
    assert diff <= 1e-5 * want.abs().max().item(), diff


def test_moe_checkpoint_loaded_as_dense_is_a_clear_error():
    """The checkpoint shape check names the experts (an MoE checkpoint into a dense model,
    and a dense one into an MoE model)."""
    import dataclasses
    from types import SimpleNamespace

    from megatron_ext.checkpointing.state import check_model_matches
    from megatron_ext.errors import CheckpointError
    from megatron_ext.models.builder import transformer_config
    from megatron_ext.models.config import ModelArgs, PrecisionArgs
    from megatron_ext.parallel import ParallelArgs

    dense = ModelArgs(model_name="mistral", num_layers=2, hidden_size=32,
                      num_attention_heads=4)
    moe = dataclasses.replace(dense, num_experts=4)

    def built(args):
        return SimpleNamespace(config=transformer_config(args, ParallelArgs(), PrecisionArgs()),
                               model_args=args.resolved())

    with pytest.raises(CheckpointError, match="--num_experts: checkpoint 4, this run None"):
        check_model_matches(dataclasses.asdict(moe), built(dense), "ckpt")
    with pytest.raises(CheckpointError, match="--num_experts: checkpoint None, this run 4"):
        check_model_matches(dataclasses.asdict(dense), built(moe), "ckpt")
    check_model_matches(dataclasses.asdict(moe), built(moe), "ckpt")  # the same: fine


# ------------------------------------------------------------------ GGUF
GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}  # llama.cpp's architectures


def write_moe_gguf(path: Path, family: str, model, sp_model: str) -> Path:
    """``model`` as llama.cpp's converter writes it: Llama q/k rows permuted (architecture
    llama), each layer's experts stacked (``ffn_gate_exps`` ``[E, F, H]``, ``ffn_up_exps``,
    ``ffn_down_exps`` ``[E, H, F]``), the router as ``ffn_gate_inp``; experts in float16."""
    import gguf

    from tests.checkpointing.gguf_files import (
        add_shape,
        add_tokenizer,
        permute_heads,
        tokenizer_metadata,
    )

    arch, config = GGUF_ARCH[family], model.config
    writer = gguf.GGUFWriter(str(path), arch)
    add_shape(writer, arch, config)
    if arch != "llama":
        writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer_metadata(Path(sp_model)))
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if ".experts." in name:  # transformers 5's stacked layout, split as llama.cpp's
            layer = name.split(".")[2]
            if name.endswith("gate_up_proj"):
                gate, up = np.split(values, 2, axis=1)
                parts = {"ffn_gate_exps": gate, "ffn_up_exps": up}
            else:
                parts = {"ffn_down_exps": values}
            for stem, part in parts.items():
                writer.add_tensor(f"blk.{layer}.{stem}.weight", part.astype(np.float16))
            continue
        stem, suffix = name.rsplit(".", 1)
        part = stem.rsplit(".", 1)[-1]
        if arch == "llama" and part in ("q_proj", "k_proj"):
            values = permute_heads(values, config.num_attention_heads if part == "q_proj"
                                   else config.num_key_value_heads)
        writer.add_tensor(f"{table.get_name(stem)}.{suffix}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_gguf_import_reproduces_the_model(moe_logits, family, tmp_path, sp_model):
    """A llama.cpp file of the model (its experts stacked, in float16) imports to the
    checkpoint its Hugging Face directory imports to (whose logits equal transformers'),
    up to the experts' float16 rounding, and as the same family and shape."""
    from safetensors.torch import load_file

    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf

    import sentencepiece

    root = moe_logits[2]
    vocab = sentencepiece.SentencePieceProcessor(model_file=sp_model).get_piece_size()
    model = hf_moe_model(family, vocab)
    path = write_moe_gguf(tmp_path / f"{family}.gguf", family, model, sp_model)
    import_hf(ImportConfig(model_path=str(path), out=str(tmp_path / "out"), progress=False))
    ours = json.loads((tmp_path / "out" / "run_config.json").read_text())["model"]
    want = json.loads((root / family / "run_config.json").read_text())["model"]
    for key in ("model_name", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                "num_layers", "kv_channels", "norm_topk_prob"):
        assert ours.get(key) == want.get(key), key
    got = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_file(root / family / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if ".experts." in name:
            assert torch.equal(got[name], tensor.half().float()), name
        else:
            assert torch.equal(got[name], tensor), name


@pytest.mark.slow
def test_gguf_export_of_a_mixture_of_experts_is_refused_clearly(moe_logits, tmp_path):
    from megatron_ext.checkpointing.gguf_export import export_gguf
    from megatron_ext.checkpointing.options import GGUFExportConfig

    with pytest.raises(UnsupportedModelError, match="convert_hf_to_gguf"):
        export_gguf(GGUFExportConfig(load=str(moe_logits[2] / "mixtral"),
                                     out=str(tmp_path / "m.gguf")))
    assert not (tmp_path / "m.gguf").exists()
