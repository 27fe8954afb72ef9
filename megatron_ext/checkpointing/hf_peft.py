"""Adapter checkpoints -> the Hugging Face PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, dir)`` loads.

Why a layout translation, not a copy: our adapters wrap megatron-core's fused
layers (``linear_qkv``: q, k and v; ``linear_fc1``: gate and up). The fused
adapter ``s B A`` is one A shared by the fused outputs and a B whose rows are
laid out like the fused weight's, so each Hugging Face projection gets the same
A and its own rows of B (and of DoRA's magnitude): exactly the update of the
fused layer, split by the family's own row layout (grouped-query heads
included).

Why the base is a Hugging Face model of its own: ``adapter_config.json``'s
``base_model_name_or_path`` is what ``peft.AutoPeftModelForCausalLM`` opens under
the adapters, so it must be a model ``transformers`` loads, with exactly the
weights the adapters were trained on. A Hugging Face directory imported as it is
is recorded as it is; anything else (a GGUF file, a model that gained tokens at
import, a checkpoint of ours) is exported once (:func:`hf_base`): beside its entry
in the import cache, shared by every adapter of that base, else inside the
adapter's directory. The tokenizer the adapters were trained with (added tokens,
the data's chat template) is written with the adapters.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.checkpointing.adapters import adapter_run_config, base_of
from megatron_ext.checkpointing.hf_tokenizer import export_hf_tokenizer
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.sources import adapter_tensors, read_run_config
from megatron_ext.checkpointing.tracker import iteration_dir, latest_iteration
from megatron_ext.errors import CheckpointError, TokenizerError
from megatron_ext.io import staged_directory, write_json
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import get_family
from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.peft.adapters import ADAPTER
from megatron_ext.peft.merge import adapted_prefixes
from megatron_ext.tokenizers import build_tokenizer, parse_extra_ids

logger = logging.getLogger(__name__)

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
    base_model: str  # adapter_config.json's base_model_name_or_path
    base_origin: str  # how that base came to be, in words
    tokenizer: bool  # whether the tokenizer was written with the adapters

    def load_lines(self) -> list[str]:
        """The Python lines that load the export with ``peft`` and ``transformers``."""
        tokenizer = self.out if self.tokenizer else self.base_model
        return ["from peft import AutoPeftModelForCausalLM",
                "from transformers import AutoTokenizer",
                f"model = AutoPeftModelForCausalLM.from_pretrained({self.out!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})"]


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
    experts = [prefix for prefix in adapted_prefixes(tensors) if ".mlp.experts." in prefix]
    if experts:  # transformers 5 holds a layer's experts as stacked parameters, no linears
        raise UnsupportedModelError(
            f"adapters on a mixture of experts' experts ({experts[0]}, ...) have no PEFT "
            "layout (transformers keeps each layer's experts as stacked parameters, not "
            "linear layers peft adapts): export the adapted model merged (tools/"
            "megatron_to_hf.py without --adapter_only), or train with --peft_target_modules "
            "linear_qkv linear_proj (attention only) for a PEFT adapter")
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


def hf_base(base_checkpoint: str, out: str, staging: str) -> tuple[str, str]:
    """(the Hugging Face model to record as the adapters' base, how it came to be): see
    the module docstring. ``out``/``staging``: the adapter export's final and staging
    directories (a base exported inside it is written to ``staging``)."""
    from megatron_ext.checkpointing.hf_export import export_hf
    from megatron_ext.checkpointing.import_cache import ensure_hf_form, is_cache_entry
    from megatron_ext.checkpointing.options import ExportConfig

    run_config = read_run_config(base_checkpoint)
    source = run_config.get("source") or {}
    hf_dir = source.get("hf_model_path")
    added = parse_extra_ids((run_config.get("tokenizer") or {}).get("vocab_extra_ids_list"))
    if hf_dir and os.path.isfile(os.path.join(hf_dir, "config.json")) and not added:
        return hf_dir, "the Hugging Face model it was imported from"

    def export(where: str) -> None:
        export_hf(ExportConfig(load=base_checkpoint, out=where, progress=False),
                  tokenizer_files=False)

    what = (f"the GGUF file {source['gguf_path']}" if source.get("gguf_path") else
            f"{hf_dir} with the tokens {', '.join(added)} added" if hf_dir else base_checkpoint)
    if is_cache_entry(base_checkpoint):
        path, made = ensure_hf_form(base_checkpoint, export)
        return path, f"{what}, {'exported' if made else 'exported before'} as a Hugging " \
                     "Face model beside its import"
    export(os.path.join(staging, "base"))
    return os.path.join(os.path.abspath(out), "base"), \
        f"{what}, exported as a Hugging Face model with the adapters"


def _write_tokenizer(run_config: dict, base_checkpoint: str, staging: str) -> bool:
    """The adapters' tokenizer (and their data's chat template) into ``staging``; False,
    with a warning, when it cannot be exported exactly."""
    from megatron_ext.checkpointing.hf_export import usable_chat_format

    tokenizer = build_tokenizer(tokenizer_config_from_run(base_checkpoint, run_config))
    chat_format, template = usable_chat_format(None, None, run_config, tokenizer)
    try:
        export_hf_tokenizer(tokenizer, chat_format, staging, template)
    except TokenizerError as exc:
        logger.warning("the adapters are exported without their tokenizer: %s", exc)
        return False
    return True


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
    base_checkpoint = base_of(run_config, load, base)  # still the adapters' own
    settings = run_config["peft"]
    model = ModelArgs.from_dict(run_config["model"]).resolved()
    tensors, targets = hf_adapter_tensors(adapter_tensors(directory), model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,  # below: a model transformers opens
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
        config["base_model_name_or_path"], origin = hf_base(base_checkpoint, out, staging)
        tokenizer = _write_tokenizer(run_config, base_checkpoint, staging)
        write_json(os.path.join(staging, CONFIG), config)
    return AdapterExportSummary(out=os.path.abspath(out), iteration=number,
                                method=settings["peft"], rank=int(settings["dim"]),
                                target_modules=targets, tensors=len(tensors),
                                seconds=time.perf_counter() - start,
                                base_model=config["base_model_name_or_path"],
                                base_origin=origin, tokenizer=tokenizer)
