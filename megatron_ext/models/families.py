"""Model families: what distinguishes Llama 1/2/3, CodeLlama, Mistral and GPT.

Why one table: a family is a handful of architectural choices (norm,
activation, positions, biases, tied embeddings, RoPE base, sliding window).
Everything that builds a model (the trainer, the HF converters) reads them
from here, so adding a family is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ext.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    normalization: str  # RMSNorm | LayerNorm
    swiglu: bool  # gated SiLU MLP (else GeLU)
    position_embedding: str  # rope | learned_absolute
    add_bias_linear: bool
    tie_embeddings: bool
    rope_theta: float = 10000.0
    layernorm_epsilon: float = 1e-5
    sliding_window: Optional[int] = None
    hf_model_type: Optional[str] = None  # config.json "model_type"

    def default_ffn_hidden_size(self, hidden_size: int) -> int:
        if not self.swiglu:
            return 4 * hidden_size
        # Llama's rule: 2/3 of 4h, rounded up to a multiple of 256 (16 for tiny models)
        multiple = 256 if hidden_size >= 1024 else 16
        size = int(2 * 4 * hidden_size / 3)
        return multiple * ((size + multiple - 1) // multiple)


FAMILIES = {
    "llama": Family("llama", "RMSNorm", True, "rope", False, False, 10000.0, 1e-6, None, "llama"),
    "llama2": Family("llama2", "RMSNorm", True, "rope", False, False, 10000.0, 1e-5, None, "llama"),
    "codellama": Family("codellama", "RMSNorm", True, "rope", False, False, 1e6, 1e-5, None, "llama"),
    "llama3": Family("llama3", "RMSNorm", True, "rope", False, False, 500000.0, 1e-5, None, "llama"),
    "mistral": Family("mistral", "RMSNorm", True, "rope", False, False, 10000.0, 1e-5, 4096,
                      "mistral"),
    "gpt": Family("gpt", "LayerNorm", False, "learned_absolute", True, True, 10000.0, 1e-5, None,
                  None),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown --model_name {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def sliding_window(model) -> Optional[int]:
    """Attention window of ``ModelArgs`` ``model``: its flag, else the family's; 0 = none."""
    window = model.sliding_window_size
    if window is None:
        window = get_family(model.model_name).sliding_window
    return window or None


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up so every TP rank holds an equal, GPU-friendly slice."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
