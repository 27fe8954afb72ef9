"""Load a Hugging Face causal LM as it is and shard it: FSDP2 per decoder layer and on the
root, over the data-parallel dimension of one device mesh.

Why these rules:

- ``from_pretrained`` from a local directory (or a ``.gguf`` file, dequantized by
  transformers) gives the model with its own code; a directory that ships code of its
  own (``auto_map``) runs it only with ``--trust_remote_code``.
- A resumed run builds the model from its config on the meta device and materializes it
  with ``to_empty``: its non-persistent buffers (RoPE's ``inv_freq``, Gemma's
  ``embed_scale``) are then uninitialized memory, because no checkpoint holds them
  (torchtitan's HF backend shipped that bug: step-0 loss 11.1 instead of 3.6);
  :func:`init_non_persistent_buffers` recomputes them with the model's own init.
- FSDP2 (``fully_shard``) keeps the parameter names (a ``DTensor`` per parameter), so a
  ``torch.distributed.checkpoint`` of it reloads at any data-parallel size and exports
  under transformers' own names.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn

from megatron_ext.errors import ConfigError
from megatron_ext.models.import_sources import GGUF_FILE, import_source_kind, read_hf_config

logger = logging.getLogger(__name__)


def known_model_types() -> frozenset[str]:
    """The ``model_type`` values this transformers knows (without importing models)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def check_model_config(hf_config: dict, where: str, trust_remote_code: bool,
                       tp: int = 1) -> None:
    """Refuse, before any process group exists, a model transformers cannot build: a
    ``model_type`` it does not know and no code of the model's own, or code of the
    model's own (``auto_map``) that the user did not allow; and tensor parallelism for a
    model without a ``tp_plan``."""
    model_type = hf_config.get("model_type")
    ships_code = bool(hf_config.get("auto_map"))
    known = model_type in known_model_types()
    if ships_code and not known and not trust_remote_code:
        raise ConfigError(
            f"{where} ships its own model code (auto_map in config.json; model_type "
            f"{model_type!r} is not one transformers knows): read it, and pass "
            "--trust_remote_code to run it")
    if not known and not ships_code:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not one this transformers knows and the "
            "directory ships no code for it; upgrade transformers (pip install -U "
            "transformers) or check config.json")
    if tp > 1 and known and not _tp_plan(model_type):
        raise ConfigError(
            f"--tensor_model_parallel_size {tp}: {where} ({model_type}) has no tensor-parallel "
            "plan (base_model_tp_plan) in transformers; use 1 (FSDP2 shards the model over "
            "every rank)")
    if ships_code and known and not trust_remote_code:
        logger.info("%s ships its own code (auto_map): not run; transformers' own %s "
                    "is used (--trust_remote_code runs the shipped one)", where, model_type)


def _tp_plan(model_type: str) -> dict:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return dict(getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None) or {})


def model_files(load: str) -> tuple[str, Optional[str]]:
    """(directory, GGUF file name or None) of the model ``load`` names."""
    if import_source_kind(load) == GGUF_FILE:
        return os.path.dirname(os.path.abspath(load)), os.path.basename(load)
    return load, None


def model_config(load: str) -> dict:
    """The model's ``config.json`` (a GGUF file's through transformers)."""
    directory, gguf = model_files(load)
    if gguf is None:
        return read_hf_config(directory)
    import transformers

    from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once

    with transformers_reads_gguf_once():
        return transformers.AutoConfig.from_pretrained(directory, gguf_file=gguf).to_dict()


def load_model(load: str, dtype: torch.dtype, trust_remote_code: bool = False,
               vocab_size: int = 0, attn_implementation: Optional[str] = None,
               tp: int = 1, dp: int = 1, bf16: bool = False) -> nn.Module:
    """The model with its weights, on the CPU, in ``dtype``; at least ``vocab_size``
    embedding rows (transformers' mean resizing adds those the tokenizer needs).

    ``tp > 1``: loaded by transformers already split by the model's ``tp_plan`` over the
    ``tp`` dimension of a (``dp``, ``tp``) mesh (TP ranks adjacent, as megatron-core
    orders them) and, with ``dp > 1``, sharded with FSDP2 over ``dp``
    (:func:`parallelize` then only makes its reductions sums)."""
    import transformers

    directory, gguf = model_files(load)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if tp > 1:
        from transformers.distributed.configuration_utils import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=tp, fsdp_size=dp,
                                                         fsdp_mixed_precision=bf16)
    from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once

    with transformers_reads_gguf_once():  # (nothing to share without a GGUF file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    _fit_vocabulary(model, vocab_size)
    return model


def build_empty_model(hf_config: dict, dtype: torch.dtype, trust_remote_code: bool = False,
                      vocab_size: int = 0, attn_implementation: Optional[str] = None
                      ) -> nn.Module:
    """The model of ``hf_config`` on the meta device (no memory, no init): for a resume,
    whose weights come from the checkpoint (:func:`materialize` after sharding)."""
    import transformers

    config = dict(hf_config)
    model_type = config.pop("model_type")
    config.pop("transformers_version", None)
    hf = transformers.AutoConfig.for_model(model_type, **config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            hf, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    _fit_vocabulary(model, vocab_size)
    return model


def _fit_vocabulary(model: nn.Module, vocab_size: int) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        logger.info("%d embedding rows for the tokenizer's %d tokens: resized", rows, vocab_size)
        model.resize_token_embeddings(vocab_size)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on ``device`` (values: uninitialized, the checkpoint
    overwrites the weights) and recompute its non-persistent buffers."""
    model.to_empty(device=device)
    init_non_persistent_buffers(model)


def init_non_persistent_buffers(model: nn.Module) -> list[str]:
    """Recompute the buffers no state dict holds (RoPE's ``inv_freq``, ...) with the
    model's own ``_init_weights`` of each module that has some; returns their names.
    (It also draws that module's own weights, if any: the checkpoint loaded afterwards
    overwrites them.)"""
    init = getattr(model, "_init_weights", None)
    names = []
    for prefix, module in model.named_modules():
        own = [name for name in module._non_persistent_buffers_set
               if module._buffers.get(name) is not None]
        if own and init is not None:
            with torch.no_grad():
                init(module)
            names += [f"{prefix}.{name}" if prefix else name for name in own]
    return names


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (``model.model.layers`` for nearly every
    transformers model): the unit of sharding, recomputation and compilation."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.endswith("layers"):
            return list(module)
    raise ConfigError(f"{type(model).__name__}: no decoder layers (a ModuleList named "
                      "'layers') found; this model cannot be sharded per layer")


def parallelize(model: nn.Module, mesh, *, recompute: bool = False,
                compile: Optional[str] = None, bf16: bool = False) -> nn.Module:
    """FSDP2 over ``mesh``'s ``dp`` dimension: each decoder layer, then the root (unless
    transformers sharded the model already, with its ``tp_plan``); the gradients are summed
    over the ranks, not averaged (the loss is already the global batch's mean).
    ``recompute``: non-reentrant activation checkpointing per layer; ``compile``:
    torch.compile per layer with that backend, after sharding (the state dict's names stay
    transformers'); ``bf16``: bf16 compute with fp32 parameters and reductions."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if recompute:  # transformers' own: the layers keep their names
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    layers = decoder_layers(model)
    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not sharded and getattr(model, "_device_mesh", None) is None:  # (else: transformers')
        for module in (*layers, model):
            fully_shard(module, mesh=mesh["dp"], mp_policy=policy)
        sharded = [*layers, model]
    for module in sharded:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # (gloo has no PREMUL_SUM)
    if compile:
        for layer in layers:
            layer.compile(backend=compile)
    return model


# megatron-core's layer names (``--peft_target_modules linear_qkv``) -> the Hugging Face
# module names of the same projections in the common architectures
MEGATRON_NAMES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv"),
    "linear_proj": ("o_proj", "dense", "out_proj"),
    "linear_fc1": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3",
                   "dense_h_to_4h"),
    "linear_fc2": ("down_proj", "fc2", "w2", "dense_4h_to_h"),
}


def adapter_targets(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The names (the last part, as peft's ``target_modules`` takes them) of the decoder
    layers' linear modules that ``patterns`` select: Hugging Face names (``q_proj``),
    patterns (``*_proj``), or megatron-core's names (``linear_qkv``: q, k and v). A
    pattern that selects nothing is an error that lists the names there are."""
    import fnmatch

    names = sorted({name.rsplit(".", 1)[-1] for layer in decoder_layers(model)
                    for name, module in layer.named_modules()
                    if isinstance(module, nn.Linear) and name})
    selected, unmatched = set(), []
    for pattern in patterns:
        hits = {name for name in names if fnmatch.fnmatchcase(name, pattern)}
        for megatron, hf in MEGATRON_NAMES.items():
            if fnmatch.fnmatchcase(megatron, pattern):
                hits |= set(hf) & set(names)
        if not hits:
            unmatched.append(pattern)
        selected |= hits
    if unmatched:
        raise ConfigError(
            f"--peft_target_modules {' '.join(unmatched)}: matches no linear layer of "
            f"{type(model).__name__}; use any of {', '.join(names)}, a pattern such as "
            f"'*_proj', or megatron-core's {', '.join(MEGATRON_NAMES)}")
    return sorted(selected)


def add_adapters(model: nn.Module, peft_args, seed: int) -> tuple[nn.Module, list[str]]:
    """``model`` with peft's LoRA (DoRA: ``use_dora``) on the selected layers, drawn from
    ``seed`` (the same on every rank); the base weights frozen. Returns the peft model
    and the adapted module names."""
    from peft import get_peft_model

    targets = adapter_targets(model, peft_args.target_names())
    torch.manual_seed(seed)
    config = lora_config(peft_args, targets)
    return get_peft_model(model, config), targets


def lora_config(peft_args, targets: list[str]):
    """peft's ``LoraConfig`` of our adapter settings."""
    from peft import LoraConfig

    return LoraConfig(r=peft_args.peft_dim, lora_alpha=peft_args.peft_alpha,
                      lora_dropout=peft_args.peft_dropout, target_modules=list(targets),
                      use_dora=peft_args.dora, task_type="CAUSAL_LM")
