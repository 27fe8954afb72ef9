"""The model families: one file each in this package, found by looking.

Why discovered: adding a family must be one new file (``<name>.py`` defining
``FAMILY``, a :class:`~megatron_ext.models.family.Family`) plus its tests.
The ``--model_name`` choices, the Hugging Face importer's detection, the
exporter and the Megatron-LLM reader and writer all ask this registry, so
nothing else lists families by hand.

Importing the registry imports the family files, which import neither torch
nor megatron-core: ``finetune.py --help`` and flag validation stay cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from typing import Any, Mapping, NamedTuple, Optional

from megatron_ext.errors import ConfigError
from megatron_ext.models.family import OFF, Family, GGUFLayout


@functools.cache
def _discovered() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family) or family.name != info.name:
            raise TypeError(f"{module.__name__} must define FAMILY = Family(name={info.name!r}, "
                            "...)")
        found[family.name] = family
    return found


def families() -> Mapping[str, Family]:
    """Every family, by name (alphabetical)."""
    return dict(_discovered())


def family_names() -> tuple[str, ...]:
    """The ``--model_name`` choices."""
    return tuple(_discovered())


def hf_family_names() -> tuple[str, ...]:
    """Families with a Hugging Face equivalent (the importer's ``--model_name`` choices)."""
    return tuple(name for name, family in _discovered().items() if family.hf is not None)


def get_family(name: str) -> Family:
    found = _discovered()
    if name not in found:
        raise ConfigError(f"unknown --model_name {name!r}: choose one of {', '.join(found)}")
    return found[name]


class SettingField(NamedTuple):
    """One family setting (:class:`~megatron_ext.models.family.FamilySettings` field) as the
    shared code sees it: its field (type, help, flag) and who declares it."""

    field: dataclasses.Field
    type: Any  # the field's type, resolved
    off: Any  # the value of families without it
    families: tuple[str, ...]  # the families that declare it


_SETTINGS: list = [None, {}]  # the _discovered() dict the settings were collected from, them


def _setting_fields() -> dict[str, SettingField]:
    discovered = _discovered()
    if _SETTINGS[0] is not discovered:  # first call, or the registry was rediscovered
        _SETTINGS[:] = [discovered, _collect_settings(discovered)]
    return _SETTINGS[1]


def _collect_settings(discovered: Mapping[str, Family]) -> dict[str, SettingField]:
    found: dict[str, SettingField] = {}
    for family in discovered.values():
        hints = typing.get_type_hints(family.settings)
        for field in dataclasses.fields(family.settings):
            seen = found.get(field.name)
            off = field.metadata.get(OFF)
            if seen is not None and (seen.type, seen.off) != (hints[field.name], off):
                raise RuntimeError(f"families {', '.join(seen.families)} and {family.name} "
                                   f"declare setting {field.name!r} differently (type, off)")
            found[field.name] = SettingField(
                seen.field if seen else field, hints[field.name], off,
                (*(seen.families if seen else ()), family.name))
    return found


def setting_fields() -> dict[str, SettingField]:
    """Every family setting, by name (each ``ModelArgs`` field and flag of its own)."""
    return dict(_setting_fields())


def gguf_layouts() -> dict[str, GGUFLayout]:
    """The GGUF architectures the families import, by llama.cpp's name."""
    found: dict[str, GGUFLayout] = {}
    for family in _discovered().values():
        if family.gguf is not None:
            if family.gguf.architecture in found:  # a bug in the family files
                raise RuntimeError(f"two families declare GGUF architecture "
                                   f"{family.gguf.architecture!r}")
            found[family.gguf.architecture] = family.gguf
    return dict(sorted(found.items()))


def family_for_hf_config(config: Mapping[str, Any]) -> Optional[Family]:
    """The family whose adapter claims ``config.json`` ``config``; None when none does."""
    claimed = [family for family in _discovered().values()
               if family.hf is not None and family.hf.matches(config)]
    if len(claimed) > 1:  # a bug in the family files, not in the user's model
        raise RuntimeError(f"families {', '.join(f.name for f in claimed)} all claim one "
                           "Hugging Face config: their matches() must exclude each other")
    return claimed[0] if claimed else None


def family_for_legacy_name(legacy_name: Any) -> Optional[Family]:
    """Our family for a Megatron-LLM ``model_name``: the one named like it, else the only
    one that is written under that name; None for names no family claims."""
    found = _discovered()
    if legacy_name in found and found[legacy_name].legacy_name == legacy_name:
        return found[legacy_name]
    claimed = [family for family in found.values() if family.legacy_name == legacy_name]
    return claimed[0] if len(claimed) == 1 else None


def closest_family(structure: Mapping[str, Any], rope_theta: float, layernorm_epsilon: float,
                   has_window: bool, prefer: str, parallel: bool = False) -> Optional[Family]:
    """The family whose defaults best describe an architecture that names no family.

    Candidates have ``structure`` (normalization, swiglu, position_embedding,
    tie_embeddings), parallel attention and MLP exactly when ``parallel`` (Falcon), and
    a default window exactly when ``has_window`` if any such family exists. Among them, a matching RoPE base counts more than a
    matching norm epsilon (the base tells generations apart); ties go to
    ``prefer``, then by name.
    """
    def score(family: Family) -> int:
        return 2 * (family.rope_theta == rope_theta) + (family.layernorm_epsilon
                                                        == layernorm_epsilon)

    # families with query/key/value biases or query/key norms only when the structure says so
    features = {"add_qkv_bias": False, "qk_layernorm": False, **structure}
    candidates = [family for family in _discovered().values()
                  if all(getattr(family, key) == value for key, value in features.items())
                  and family.parallel_layers == parallel]
    candidates = ([family for family in candidates if bool(family.sliding_window) == has_window]
                  or candidates)
    if not candidates:
        return None
    best = max(score(family) for family in candidates)
    tied = [family for family in candidates if score(family) == best]
    return next((family for family in tied if family.name == prefer), tied[0])
