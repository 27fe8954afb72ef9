"""LoRA / DoRA settings and which layers they adapt (no torch).

Why apart from the modules: ``finetune.py`` validates its flags before torch is
imported, and the exporter needs the Hugging Face names of the adapted layers
without building a model. The flags are NeMo's recipe names (``--peft lora``,
``--peft_dim``, ``--peft_alpha``, ...), with TRL's spellings as aliases.

Targets: megatron-core fuses Hugging Face's q/k/v projections into one
``linear_qkv`` and gate/up into one ``linear_fc1``, so an adapter wraps the
fused layer. A Hugging Face name (``q_proj``, ``*_proj``) selects the fused
layer that holds it; the adapter then covers the whole fused layer (for
``q_proj``: q, k and v), and its export writes one adapter per Hugging Face
projection with the same effect.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_ext.cli import flag_name, option
from megatron_ext.errors import ConfigError

# megatron-core's four linear layers of a transformer layer: short name -> module path in the layer
LINEARS: dict[str, str] = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
# the column-parallel ones (output split over tensor-parallel ranks); the others are row-parallel
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
DEFAULT_TARGETS = tuple(LINEARS)
METHODS = ("lora", "dora")
A_INITS = ("kaiming", "xavier")
ADAPTER = "adapter"  # the child module's name: keys ``....linear_qkv.adapter.lora_A``
NORM_EPS = 1e-12  # DoRA: floor of a row norm (fp32)


def _targets(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class PeftArgs:
    peft: Optional[str] = option(
        None, "train low-rank adapters instead of all weights: lora, or dora (LoRA with a "
              "learned magnitude per output row); the base weights stay frozen and "
              "checkpoints hold the adapters only", choices=METHODS,
        aliases=("--peft_scheme",), presets=(("--use_peft", "lora"),))
    peft_target_modules: tuple[str, ...] = option(
        DEFAULT_TARGETS, "layers to adapt: megatron-core names (linear_qkv linear_proj "
                         "linear_fc1 linear_fc2) or Hugging Face names and patterns (q_proj, "
                         "v_proj, gate_proj, '*_proj'); space- or comma-separated. q/k/v and "
                         "gate/up are fused layers here: naming one adapts the fused layer",
        aliases=("--lora_target_modules", "--target_modules"), metavar="NAME")
    peft_dim: int = option(16, "adapter rank r", aliases=("--lora_r", "--lora_rank"))
    peft_alpha: float = option(32.0, "adapter scaling numerator: updates are scaled by "
                                     "alpha / r", aliases=("--lora_alpha",))
    peft_dropout: float = option(0.0, "dropout on the adapters' input while training",
                                 aliases=("--lora_dropout",))
    lora_A_init: str = option("kaiming", "initialisation of A (B starts at zero, so step 0 "
                                         "computes exactly the base model)", choices=A_INITS,
                              names=("--lora_A_init",), aliases=("--lora_a_init",))

    @property
    def enabled(self) -> bool:
        return self.peft is not None

    @property
    def dora(self) -> bool:
        return self.peft == "dora"

    @property
    def scaling(self) -> float:
        return self.peft_alpha / self.peft_dim

    def target_names(self) -> tuple[str, ...]:
        """The target patterns, commas split (``--peft_target_modules linear_qkv,linear_fc2``)."""
        return tuple(name for value in self.peft_target_modules for name in _targets(value))

    def problems(self, tp: int) -> list[str]:
        """What is wrong with these settings (empty when fine); pure. Adapter settings
        without ``--peft`` would do nothing: they are refused."""
        if not self.enabled:
            unused = [f"{flag_name(PeftArgs, f.name)} {_shown(getattr(self, f.name))}"
                      for f in dataclasses.fields(self)
                      if f.name != "peft" and getattr(self, f.name) != f.default]
            return [f"{', '.join(unused)}: adapter settings, which do nothing without --peft; "
                    "add --peft lora (or --peft dora), or remove them"] if unused else []
        problems = []
        if self.peft_dim < 1:
            problems.append(f"--peft_dim must be positive, got {self.peft_dim}")
        elif self.peft_dim % tp:
            problems.append(f"--peft_dim {self.peft_dim} must be divisible by "
                            f"--tensor_model_parallel_size {tp} (the column-parallel layers' "
                            "A is split along the rank)")
        if not 0.0 <= self.peft_dropout < 1.0:
            problems.append(f"--peft_dropout must be in [0, 1), got {self.peft_dropout}")
        if not self.target_names():
            problems.append("--peft_target_modules names no layer")
        return problems

    @classmethod
    def from_settings(cls, settings: Mapping) -> "PeftArgs":
        """The args a checkpoint's :meth:`settings` were made from."""
        return cls(peft=settings["peft"], peft_target_modules=tuple(settings["targets"]),
                   peft_dim=int(settings["dim"]), peft_alpha=float(settings["alpha"]),
                   peft_dropout=float(settings["dropout"]),
                   lora_A_init=settings["lora_A_init"])

    def settings(self, targets: tuple[str, ...]) -> dict:
        """What a checkpoint records (and a resume must match): the method and the shape."""
        return {"peft": self.peft, "targets": list(targets), "dim": self.peft_dim,
                "alpha": self.peft_alpha, "dropout": self.peft_dropout,
                "lora_A_init": self.lora_A_init}


def _shown(value) -> str:
    return " ".join(value) if isinstance(value, tuple) else str(value)


def resolve_targets(patterns: tuple[str, ...], hf_linear_names: Optional[Mapping[str, tuple]]
                    ) -> tuple[str, ...]:
    """The megatron-core layers (short names of :data:`LINEARS`, in that order) selected by
    ``patterns``: megatron names, Hugging Face module names of the family
    (``hf_linear_names``: module path in the layer -> its HF module paths, None for a
    family without a Hugging Face equivalent), or shell patterns of either. A pattern that
    selects nothing is an error that lists the names there are."""
    selected: set[str] = set()
    known: dict[str, str] = {}  # every accepted name -> its megatron short name
    for short, path in LINEARS.items():
        known[short] = short
        known[path] = short
        for hf_path in (hf_linear_names or {}).get(path, ()):
            known[hf_path] = short
            known[hf_path.rsplit(".", 1)[-1]] = short  # q_proj as well as self_attn.q_proj
    unmatched = []
    for pattern in patterns:
        hits = {short for name, short in known.items() if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            unmatched.append(pattern)
        selected |= hits
    if unmatched:
        names = sorted({name for name in known if "." not in name})
        raise ConfigError(
            f"--peft_target_modules {' '.join(unmatched)}: matches no layer of this model; "
            f"use any of {', '.join(names)} (or a pattern such as '*_proj')")
    return tuple(short for short in LINEARS if short in selected)
