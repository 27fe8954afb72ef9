"""Child process for test_hf_weights.py: HF Llama/Mistral/Qwen logits vs our converted model.

  python check_hf_logits.py convert OUT FAMILY...   (world size 1: convert, compare, save TP=1 checkpoints)
  torchrun ... check_hf_logits.py check OUT FAMILY...   (any TP: load the checkpoints, compare)
Each family's files are in OUT/FAMILY. Prints one JSON line per family on rank 0:
``{"family": ..., "max_abs_diff": ...}``, the largest absolute logit difference.
Several families per process: starting one costs more than checking one
(test_hf_weights.py calls ``main([mode, OUT, FAMILY...])`` in the session's run_many.py
workers).
"""

import json
import os
import sys

import torch

from megatron_ext.models.builder import build_gpt_model, transformer_config
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.models.hf_llama import llama_to_megatron
from megatron_ext.models.masks import attention_mask
from megatron_ext.parallel import ParallelArgs, init_distributed

VOCAB, PADDED = 300, 384
SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, max_position_embeddings=128, vocab_size=VOCAB)


# the architectures beyond plain Llama: transformers classes, their config, our ModelArgs
VARIANTS = {
    "llama-tied": dict(hf="Llama", config=dict(tie_word_embeddings=True),
                       ours=dict(model_name="llama2", tie_embeddings=True)),
    # Qwen's own defaults (norm epsilon 1e-6, RoPE base 1e6) left to the family file
    "qwen2": dict(hf="Qwen2", config=dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                          rope_theta=1e6),
                  ours=dict(model_name="qwen2", tie_embeddings=True, layernorm_epsilon=None,
                            rope_theta=None)),
    "qwen3": dict(hf="Qwen3", config=dict(head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6),
                  ours=dict(model_name="qwen3", kv_channels=32, layernorm_epsilon=None,
                            rope_theta=None)),
}


def perturb_biases_and_norms(model) -> None:
    """transformers starts biases at 0 and norms at 1, where a wrong mapping goes unseen."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                base = 1.0 if "norm" in name else 0.0
                parameter.copy_(base + 0.3 * torch.randn(parameter.shape, generator=g))


def hf_model(family: str, window: int = 8, **settings):
    import transformers

    torch.manual_seed(0)
    if family == "mistral":
        config = transformers.MistralConfig(**SHAPE, sliding_window=window, **settings)
        model = transformers.MistralForCausalLM(config)
    elif family in VARIANTS:
        variant = VARIANTS[family]
        config = getattr(transformers, variant["hf"] + "Config")(
            **{**SHAPE, **variant["config"], **settings})
        model = getattr(transformers, variant["hf"] + "ForCausalLM")(config)
        perturb_biases_and_norms(model)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, **settings))
    model.config._attn_implementation = "eager"
    return model.eval()


def to_megatron(family: str, hf_state: dict) -> dict:
    """The HF model's weights in our unsharded names, the variant's layout flags applied."""
    from megatron_ext.models.families import get_family

    args = our_args(family)
    adapter = get_family(args.model_name).hf
    return llama_to_megatron(hf_state, 2, 4, 2, VOCAB, PADDED, args.resolved().tie_embeddings,
                             adapter.qkv_bias, adapter.qk_norm)


def our_args(family: str) -> ModelArgs:
    base = dict(model_name="mistral" if family == "mistral" else "llama2", num_layers=2,
                hidden_size=64, num_attention_heads=4, num_attention_heads_kv=2,
                ffn_hidden_size=176, seq_length=128, layernorm_epsilon=1e-5,
                rope_theta=10000.0, sliding_window_size=8 if family == "mistral" else None)
    base.update(VARIANTS.get(family, {}).get("ours", {}))
    return ModelArgs(**base)


def our_model(family: str, tp: int):
    args = our_args(family)
    config = transformer_config(args, ParallelArgs(tensor_model_parallel_size=tp), PrecisionArgs())
    return build_gpt_model(args, config, PADDED, True, True).eval(), args


def logits(model, tokens, window):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    segments = torch.ones_like(tokens, dtype=torch.int32)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        out = model(tokens, position_ids, attention_mask(segments, window))
    return gather_from_tensor_model_parallel_region(out)[..., :VOCAB]


def check(mode: str, family: str, out: str, tp: int, layout) -> None:
    """One family's check, in OUT/FAMILY."""
    from megatron.core import dist_checkpointing

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 24))
    model, args = our_model(family, tp)
    window = args.sliding_window_size
    if mode == "convert":
        reference = hf_model(family)
        with torch.no_grad():
            expected = reference(tokens).logits
        state = to_megatron(family, reference.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
        torch.save(expected, os.path.join(out, "hf_logits.pt"))
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(out, "ckpt"))
    else:
        expected = torch.load(os.path.join(out, "hf_logits.pt"))
        loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(out, "ckpt"))
        model.load_state_dict(loaded, strict=False)
    diff = (logits(model, tokens, window) - expected).abs().max().item()
    unwindowed = 0.0
    if mode == "convert" and family == "mistral":
        # the window must matter for this input (24 tokens, window 8)
        with torch.no_grad():
            unwindowed = (hf_model(family, window=None)(tokens).logits - expected).abs().max().item()
    if layout.rank == 0:
        print(json.dumps({"family": family, "max_abs_diff": diff,
                          "scale": expected.abs().max().item(),
                          "diff_without_window": unwindowed}), flush=True)


def main(argv=None) -> None:
    mode, out, *families = sys.argv[1:] if argv is None else argv
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    layout = init_distributed(tp, 1, 1234)
    for family in families:
        os.makedirs(os.path.join(out, family), exist_ok=True)
        check(mode, family, os.path.join(out, family), tp, layout)


if __name__ == "__main__":
    main()
