"""Hugging Face ``config.json`` <-> our ``ModelArgs``, for whichever family a config is.

Why a dispatcher: the importer and the exporter do not know the families;
they ask the registry which family claims a config (each family's
``matches``) or names a model, and call that family's adapter.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import (
    families,
    family_for_hf_config,
    get_family,
    hf_family_names,
)
from megatron_ext.models.family import Family, HFAdapter, UnsupportedModelError


def _claiming_family(config: Mapping[str, Any], source: str) -> Family:
    """The family whose ``matches`` claims ``config``; refuses a model no family reads."""
    family = family_for_hf_config(config)
    if family is None:
        model_types = sorted({f.hf.model_type for f in families().values() if f.hf})
        architectures = ", ".join(config.get("architectures") or []) or "?"
        raise UnsupportedModelError(
            f"{source}: model_type {config.get('model_type')!r} ({architectures}) is not "
            f"supported; this tool converts {', '.join(model_types)} (families "
            f"{', '.join(hf_family_names())})")
    return family


def hf_adapter(config: Mapping[str, Any], source: str = "config.json") -> HFAdapter:
    """The adapter that reads ``config`` and its weights: the family's own, bound to the
    model's layout where its tensor names depend on it (the adapter's ``for_config``:
    Falcon's norms and biases)."""
    adapter = _claiming_family(config, source).hf
    bind = getattr(adapter, "for_config", None)
    return bind(config) if bind is not None else adapter


def family_from_hf_config(config: Mapping[str, Any]) -> str:
    """Our ``--model_name`` for a config."""
    return _claiming_family(config, "config.json").name


def export_adapter(model_name: str) -> HFAdapter:
    """The adapter that writes family ``model_name``; refuses a family without one."""
    family = families().get(model_name)
    if family is None or family.hf is None:
        raise UnsupportedModelError(
            f"the {model_name!r} family has no Hugging Face equivalent; conversion supports "
            f"{', '.join(hf_family_names())}")
    return family.hf


def model_args_from_hf_config(config: Mapping[str, Any], model_name: Optional[str] = None,
                              source: str = "config.json") -> dict:
    """``ModelArgs`` fields for an HF config; refuses what we cannot match.

    ``model_name`` overrides the detected family's name (its weights and config
    are still read as the config's own family).
    """
    family = _claiming_family(config, source)
    name = model_name or family.name
    export_adapter(name)  # the name must be one we can convert back
    chosen = get_family(name)
    layout = ("add_qkv_bias", "qk_layernorm", "normalization", "swiglu", "position_embedding")
    differ = [key for key in layout if getattr(chosen, key) != getattr(family, key)]
    if differ:
        raise UnsupportedModelError(
            f"{source}: --model_name {name} has another layer layout than this "
            f"{family.name} model ({', '.join(differ)}); leave --model_name out")
    return family.hf.model_args(config, name, source)


def hf_config_from_model_args(model: Mapping[str, Any], vocab_size: int,
                              bos_token_id: Optional[int], eos_token_id,
                              pad_token_id: Optional[int], torch_dtype: str,
                              max_position_embeddings: Optional[int] = None) -> dict:
    """``config.json`` for ``transformers`` from a run's model arguments."""
    args = ModelArgs.from_dict(model).resolved()
    return export_adapter(args.model_name).hf_config(
        args, vocab_size, bos_token_id, eos_token_id, pad_token_id, torch_dtype,
        max_position_embeddings)
