"""Adapter checkpoints -> the Hugging Face PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, dir)`` loads.

Why a layout translation, not a copy: our adapters wrap megatron-core's fused
layers (``linear_qkv``: q, k and v; ``linear_fc1``: gate and up). The fused
adapter ``s B A`` is one A shared by the fused outputs and a B whose rows are
laid out like the fused weight's, so each Hugging Face projection gets the same
A and its own rows of B (and of DoRA's magnitude): exactly the update of the
fused layer, split by the family's own row layout (grouped-query heads
included).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.checkpointing.adapters import adapter_run_config, base_of
from megatron_ext.checkpointing.sources import adapter_tensors
from megatron_ext.checkpointing.tracker import iteration_dir, latest_iteration
from megatron_ext.errors import CheckpointError
from megatron_ext.io import staged_directory, write_json
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import get_family
from megatron_ext.peft.adapters import ADAPTER
from megatron_ext.peft.merge import adapted_prefixes

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class AdapterExportSummary:
    out: str
    iteration: int
    method: str  # lora | dora
    rank: int
    target_modules: list[str]
    tensors: int
    seconds: float


def _adapter_directory(load: str, iteration: Optional[int]) -> tuple[str, int]:
    if os.path.isfile(os.path.join(load, ".metadata")):
        return load, -1
    number = iteration if iteration is not None else latest_iteration(load)
    if number is None:
        raise CheckpointError(f"{load}: no checkpoint found")
    return iteration_dir(load, number), number


def hf_adapter_tensors(tensors: dict[str, torch.Tensor], model: ModelArgs
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our unsharded adapter tensors as PEFT's (``base_model.model.<HF module>.lora_A.weight``,
    ``.lora_B.weight``, ``.lora_magnitude_vector``), and the HF module names adapted."""
    family = get_family(model.model_name)
    if family.hf is None:
        raise CheckpointError(f"family {model.model_name} has no Hugging Face equivalent: its "
                              "adapters cannot be exported to the PEFT layout")
    heads, kv = model.num_attention_heads, model.num_attention_heads_kv
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for prefix in adapted_prefixes(tensors):
        match = _PREFIX.match(prefix)
        if match is None:
            raise CheckpointError(f"adapter {prefix}: not in a decoder layer")
        layer, module = int(match.group(1)), match.group(2)
        hf_modules = family.hf.linear_names[module]
        layer_names = family.hf.layer_names(layer)
        first = next(name for name in layer_names if name.endswith(f"{hf_modules[0]}.weight"))
        hf_layer = first[:-len(f"{hf_modules[0]}.weight")]  # "model.layers.3."
        a = tensors[f"{prefix}.{ADAPTER}.lora_A"]
        rows = family.hf.linear_rows_from_megatron(module, tensors[f"{prefix}.{ADAPTER}.lora_B"],
                                                   heads, kv)
        magnitude = tensors.get(f"{prefix}.{ADAPTER}.magnitude")
        magnitudes = (family.hf.linear_rows_from_megatron(module, magnitude, heads, kv)
                      if magnitude is not None else {})
        for hf_module, b in rows.items():
            key = f"base_model.model.{hf_layer}{hf_module}"
            out[f"{key}.lora_A.weight"] = a.contiguous().clone()
            out[f"{key}.lora_B.weight"] = b.contiguous().clone()
            if hf_module in magnitudes:
                out[f"{key}.lora_magnitude_vector"] = magnitudes[hf_module].contiguous().clone()
            short = hf_module.rsplit(".", 1)[-1]
            if short not in targets:
                targets.append(short)
    return out, targets


def export_adapter(load: str, out: str, iteration: Optional[int] = None,
                   base: Optional[str] = None, overwrite: bool = False
                   ) -> AdapterExportSummary:
    """Write the PEFT directory for the adapter checkpoint ``load``; nothing is left at
    ``out`` on failure."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    run_config = adapter_run_config(load)
    if run_config is None:
        raise CheckpointError(f"--adapter_only: {load} is not an adapter checkpoint (the --save "
                              "directory of a finetune.py --peft run)")
    directory, number = _adapter_directory(load, iteration)
    base_record = run_config.get("base") or {}
    base_of(run_config, load, base)  # the base must still be the adapters' own
    settings = run_config["peft"]
    model = ModelArgs.from_dict(run_config["model"]).resolved()
    tensors, targets = hf_adapter_tensors(adapter_tensors(directory), model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_record.get("load"),
        "r": int(settings["dim"]),
        "lora_alpha": float(settings["alpha"]),
        "lora_dropout": float(settings["dropout"]),
        "target_modules": targets,
        "use_dora": settings["peft"] == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with staged_directory(out, overwrite) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS), metadata={"format": "pt"})
        write_json(os.path.join(staging, CONFIG), config)
    return AdapterExportSummary(out=out, iteration=number, method=settings["peft"],
                                rank=int(settings["dim"]), target_modules=targets,
                                tensors=len(tensors), seconds=time.perf_counter() - start)
