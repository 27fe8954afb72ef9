"""A PEFT adapter trained on a GGUF base exports with a base ``peft.AutoPeftModelForCausalLM``
opens (the GGUF import as a Hugging Face model, beside its cache entry, shared by the
adapters of that base), and the export summary's lines load it: they give the logits of our
merged export. In-process: the adapter checkpoint is written here (random LoRA weights on
the GGUF import), nothing is trained."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from megatron_ext.peft.config import ADAPTER
from tests.checkpointing.gguf_files import SHAPE, write_gguf
from tests.conftest import REPO

RANK = 4
FLOAT = {kind: "F16" for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj", "embed_tokens", "lm_head")}


def adapter_tensors() -> dict[str, torch.Tensor]:
    """LoRA on every layer's fused q/k/v and its down projection (B not zero: the adapters
    change the model)."""
    hidden, ffn = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    head = hidden // SHAPE["num_attention_heads"]
    qkv = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * head
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(SHAPE["num_hidden_layers"]):
        for module, rows, cols in (("self_attention.linear_qkv", qkv, hidden),
                                   ("mlp.linear_fc2", hidden, ffn)):
            prefix = f"decoder.layers.{layer}.{module}.{ADAPTER}"
            tensors[f"{prefix}.lora_A"] = torch.randn(RANK, cols, generator=generator) * 0.05
            tensors[f"{prefix}.lora_B"] = torch.randn(rows, RANK, generator=generator) * 0.05
    return tensors


def write_adapter_checkpoint(save: Path, gguf: Path, entry: str) -> None:
    """What finetune.py --load GGUF --peft lora --save SAVE leaves (the tensors are read
    through the patched ``adapter_tensors``)."""
    from megatron_ext.checkpointing.adapters import base_record
    from megatron_ext.checkpointing.run_config import load_run_config
    from megatron_ext.checkpointing.tracker import iteration_dir, write_tracker

    imported = load_run_config(entry)
    directory = Path(iteration_dir(str(save), 1))
    directory.mkdir(parents=True)
    (directory / ".metadata").write_bytes(b"")
    run_config = {
        "model": imported["model"], "tokenizer": imported["tokenizer"],
        "tokenizer_identity": imported["tokenizer_identity"],
        "precision": {"bf16": False, "fp16": False}, "checkpoint": {"load": str(gguf)},
        "peft": {"peft": "lora", "targets": ["linear_qkv", "linear_fc2"], "dim": RANK,
                 "alpha": 8.0, "dropout": 0.0, "lora_A_init": "kaiming"},
        "base": base_record(str(gguf), entry)}
    (directory / "run_config.json").write_text(json.dumps(run_config), encoding="utf-8")
    write_tracker(str(save), 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sp_model) -> dict:
    from megatron_ext.checkpointing import hf_peft, sources
    from megatron_ext.checkpointing.import_cache import ensure_imported

    root = tmp_path_factory.mktemp("gguf_adapter")
    gguf, _ = write_gguf(root / "mistral.gguf", "mistral", Path(sp_model), types=FLOAT)
    entry = ensure_imported(str(gguf), str(root / "cache")).path
    tensors = adapter_tensors()
    with pytest.MonkeyPatch.context() as patch:
        for module in (hf_peft, sources):
            patch.setattr(module, "adapter_tensors", lambda directory: dict(tensors))
        for name in ("first", "second"):
            write_adapter_checkpoint(root / name, gguf, entry)
        spec = importlib.util.spec_from_file_location("megatron_to_hf",
                                                      REPO / "tools" / "megatron_to_hf.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        printed = {}
        for name in ("first", "second"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert tool.main(["--load", str(root / name), "--out",
                                  str(root / f"{name}-adapter"), "--adapter_only"]) == 0
            printed[name] = out.getvalue()
        from megatron_ext.checkpointing.hf_export import export_hf
        from megatron_ext.checkpointing.options import ExportConfig

        export_hf(ExportConfig(load=str(root / "first"), out=str(root / "merged"),
                               progress=False))
    return {"root": root, "gguf": gguf, "entry": entry, "printed": printed}


def test_the_adapter_records_a_base_transformers_opens(exported):
    root, entry = exported["root"], exported["entry"]
    config = json.loads((root / "first-adapter" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert base == entry + ".hf" and not base.endswith(".gguf")
    assert (Path(base) / "config.json").is_file() and list(Path(base).glob("*.safetensors"))
    # the second adapter of the same base shares that export
    second = json.loads((root / "second-adapter" / "adapter_config.json").read_text())
    assert second["base_model_name_or_path"] == base
    assert f"the GGUF file {exported['gguf']}, exported as" in exported["printed"]["first"]
    assert "exported before" in exported["printed"]["second"]
    assert len(list(Path(entry).parent.glob("*.hf"))) == 1


def test_the_printed_lines_load_the_adapted_model(exported):
    import transformers

    printed = exported["printed"]["first"]
    lines = printed.split("load with:\n", 1)[1].splitlines()
    code = "\n".join(line.strip() for line in lines if line.startswith("    "))
    assert "AutoPeftModelForCausalLM.from_pretrained(" in code
    names: dict = {}
    exec(code, names)  # what a user pastes
    model, tokenizer = names["model"].eval(), names["tokenizer"]
    ids = torch.tensor([tokenizer("Hello world, what is the capital of France?")["input_ids"]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(exported["root"] / "merged",
                                                               dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(
        exported["entry"] + ".hf", dtype=torch.float32).eval()
    for m in (model, merged, base):
        m.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs, ours, plain = model(ids).logits, merged(ids).logits, base(ids).logits
    scale = ours.abs().max()
    assert float((theirs - ours).abs().max() / scale) <= 1e-4
    assert float((plain - ours).abs().max() / scale) > 1e-3  # the adapters are applied

