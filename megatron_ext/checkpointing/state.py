"""What every checkpoint form restores into: the train state, the run position, the model check.

Why apart from the formats: the dist loader, the unsharded loader and the
legacy reader all restore into the same :class:`TrainState`, return the same
:class:`Progress` and refuse a model of another shape the same way, so those
live below the format modules, which then import each other in one direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ext.errors import CheckpointError
from megatron_ext.models.builder import transformer_config
from megatron_ext.models.config import ModelArgs, PrecisionArgs, setting_differences
from megatron_ext.parallel import ParallelArgs

# The distributed optimizer's layout-independent format: one state tensor per parameter,
# as the plain optimizer saves it. megatron-core 0.16's default for it
# ("fully_sharded_model_space") builds flattened shards that 0.16 itself refuses.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Progress:
    """Where a run is: what a resume needs besides weights and optimizer state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


@dataclass
class TrainState:
    """The objects a checkpoint saves and restores.

    ``model`` is the unwrapped megatron-core module (``sharded_state_dict``);
    ``optimizer`` and ``scheduler`` may be None for weights-only use (tools).
    ``layout`` needs ``rank``, ``tp``, ``pp``, ``dp``, ``tp_rank``, ``pp_rank``,
    ``dp_rank`` and ``is_logger`` (``cp`` and ``cp_rank`` when it has context
    parallelism).
    """

    model: object
    layout: object
    optimizer: Optional[object] = None
    scheduler: Optional[object] = None
    # which of the model's tensors a checkpoint holds: all of them, the base weights of a
    # model with adapters (its adapters start fresh), or its adapters only (adapter-only
    # checkpoints of PEFT runs: the base weights come from the base checkpoint)
    parts: str = "all"  # all | base | adapters

    def model_state(self) -> dict:
        """The model's sharded state dict, restricted to :attr:`parts`."""
        return select_parts(self.model.sharded_state_dict(), self.parts)


def _is_adapter_key(key: str) -> bool:
    return ".adapter." in key  # megatron_ext.peft.adapters.ADAPTER, without importing torch code


def select_parts(state: dict, parts: str) -> dict:
    """``state`` (keys of a model's state dict) without the keys ``parts`` excludes."""
    if parts == "all":
        return state
    adapters = parts == "adapters"
    return {k: v for k, v in state.items() if _is_adapter_key(k) == adapters}


def restore_training_state(train: TrainState, loaded: dict) -> Progress:
    """Load optimizer and scheduler state from a loaded checkpoint; returns the saved position.

    ``loaded`` holds ``optimizer`` and ``common`` (the scheduler state and the
    :class:`Progress` fields), as every checkpoint form with optimizer state does.
    """
    train.optimizer.load_state_dict(loaded["optimizer"])
    common = loaded["common"]
    train.scheduler.load_state_dict(common["scheduler"])
    return Progress(common["iteration"], common["consumed_samples"], common["consumed_tokens"])


def check_model_matches(saved_model: dict, model, source: str) -> None:
    """Refuse to load weights into a model whose architecture differs from the checkpoint's.

    Shapes alone do not catch everything: another RoPE base, norm epsilon or
    window computes a different function with the same tensors, and fewer
    layers would load a prefix of the model. ``saved_model`` is the run
    config's ``model`` section; ``model`` the megatron-core ``GPTModel``.
    """
    if not saved_model:
        return
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    args = ModelArgs.from_dict(saved_model).resolved()
    want = transformer_config(args, ParallelArgs(), PrecisionArgs())
    have = model.config
    names = {"num_layers": "--num_layers", "hidden_size": "--hidden_size",
             "num_attention_heads": "--num_attention_heads",
             "num_query_groups": "--num_attention_heads_kv", "ffn_hidden_size": "--ffn_hidden_size",
             "layernorm_epsilon": "--layernorm_epsilon", "window_size": "--sliding_window_size",
             "normalization": "--model_name", "gated_linear_unit": "--model_name",
             "add_qkv_bias": "--model_name", "qk_layernorm": "--model_name",
             # a mixture of experts loaded as a dense model (or the other way round)
             "num_moe_experts": "--num_experts", "moe_router_topk": "--moe_router_topk",
             "moe_ffn_hidden_size": "--moe_ffn_hidden_size"}
    problems = [f"{flag}: checkpoint {getattr(want, key)}, this run {getattr(have, key)}"
                for key, flag in names.items() if getattr(want, key) != getattr(have, key)]
    if want.kv_channels != have.kv_channels:
        problems.append(f"--kv_channels: checkpoint {want.kv_channels}, this run "
                        f"{have.kv_channels}")
    tied = bool(getattr(model, "share_embeddings_and_output_weights", args.tie_embeddings))
    if bool(args.tie_embeddings) != tied:
        problems.append(f"--tie_embed_logits: checkpoint {args.tie_embeddings}, this run {tied}")
    theta = float(args.rope_theta)
    if getattr(model, "position_embedding_type", None) == "rope" and \
            abs(float(getattr(model, "rotary_base", theta)) - theta) > 1e-6 * theta:
        problems.append(f"--rope_theta: checkpoint {theta:g}, this run {model.rotary_base:g}")
    built = getattr(model, "model_args", None)  # build_gpt_model's resolved ModelArgs
    if built is not None:  # RoPE scaling and every family setting
        problems += setting_differences(args, built)
    if problems:
        raise CheckpointError(f"{source} was made for another model shape ("
                              + "; ".join(problems) + "); pass --use_checkpoint_args to take the "
                              "checkpoint's, or fix the flags")


def without_extra_state(model_state: dict) -> dict:
    """The model's sharded state minus ``_extra_state`` objects.

    megatron-core's local (non-Transformer-Engine) layers keep no extra state
    (it is None), and checkpoints written by the conversion tools omit it.
    """
    return {k: v for k, v in model_state.items() if not k.endswith("_extra_state")}


def load_model_weights(model, weights: dict, source: str, parts: str = "all") -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = list(select_parts({k: None for k in missing if not k.endswith("_extra_state")},
                                parts))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not fit the model (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
