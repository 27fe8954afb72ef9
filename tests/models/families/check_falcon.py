"""Child process for tests/models/families/test_falcon.py: our Falcon model against
``transformers``' ``FalconForCausalLM`` in one process group (TP = world size), without a checkpoint.

  python check_falcon.py OUT.json                          (TP=1)
  torchrun --nproc_per_node 2 check_falcon.py OUT.json     (TP=2)

(test_falcon.py calls ``main([OUT.json])`` in the session's run_many.py workers.)

For each tiny random model of :data:`MODELS` (the 7B layout: one norm, multi-query
attention, no biases; the new decoder architecture: two norms, two key/value heads,
biases), initialised with std 0.2 (clear greedy margins, see
``tests/inference/check_generation.py``) and biases and norms perturbed, the weights are
converted by the family's adapter and loaded into our model at TP = world size; rank 0
writes per model the logits' largest difference from transformers (eager attention), our
and transformers' greedy continuations, the KV cache against a full forward, and the
smallest greedy margin.
"""

from __future__ import annotations

import json
import os
import sys

import torch

VOCAB, PADDED = 300, 384
NEW_TOKENS = 16
INIT_STD = 0.2
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, layer_norm_epsilon=1e-5,
             initializer_range=INIT_STD, bos_token_id=1, eos_token_id=2)
MODELS = {
    # Falcon-7B: one LayerNorm, one key/value head, no biases, tied embeddings
    "falcon-7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                      bias=False),
    # Falcon-40B: ln_attn/ln_mlp, grouped-query attention, biases exercised, untied
    "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2,
                       num_ln_in_parallel_attn=2, bias=True, tie_word_embeddings=False),
}


def hf_model(name: str):
    """A random ``FalconForCausalLM`` of :data:`MODELS` (biases and norms perturbed)."""
    import transformers

    from tests.models.check_hf_logits import perturb_biases_and_norms

    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(**SHAPE, **MODELS[name]))
    perturb_biases_and_norms(model)
    model.config._attn_implementation = "eager"
    return model.eval()


def our_model(config: dict, tp: int):
    """Our model for an HF ``config`` (dict), at TP ``tp``, built as the importer reads it."""
    from megatron_ext.models.builder import build_gpt_model, transformer_config
    from megatron_ext.models.config import ModelArgs, PrecisionArgs
    from megatron_ext.models.hf_config import model_args_from_hf_config
    from megatron_ext.parallel import ParallelArgs

    args = ModelArgs(**model_args_from_hf_config(config))
    built = transformer_config(args, ParallelArgs(tensor_model_parallel_size=tp),
                               PrecisionArgs())
    return build_gpt_model(args, built, PADDED, True, True).eval()


def megatron_state(reference) -> dict:
    """The HF model's weights through the family's adapter (unsharded megatron names)."""
    from megatron_ext.models.hf_config import hf_adapter

    config = reference.config.to_dict()
    adapter = hf_adapter(config)
    hf = reference.state_dict()
    tied = bool(config.get("tie_word_embeddings"))
    heads, kv = reference.config.num_attention_heads, _kv_heads(config)
    state = adapter.embeddings_to_megatron({n: hf.get(n) for n in adapter.embedding_names(tied)},
                                           VOCAB, PADDED, tied)
    for layer in range(reference.config.num_hidden_layers):
        state.update(adapter.layer_to_megatron({n: hf[n] for n in adapter.layer_names(layer)},
                                               layer, heads, kv))
    return state


def _kv_heads(config: dict) -> int:
    from megatron_ext.models.hf_config import model_args_from_hf_config

    return model_args_from_hf_config(config)["num_attention_heads_kv"]


def check(name: str, tp: int, rank: int) -> dict:
    from megatron_ext.inference.generation import SamplingParams, forward_logits, generate
    from tests.inference.check_generation import greedy_margin, hf_greedy, prompts, tp_slice

    reference = hf_model(name)
    model = our_model(reference.config.to_dict(), tp)
    missing, unexpected = model.load_state_dict(
        tp_slice(megatron_state(reference), model, tp, rank), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing,
                                                                                 unexpected)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = reference(tokens).logits
    ours = forward_logits(model, tokens, None, VOCAB)
    batch = prompts()
    results = generate(model, batch, SamplingParams(max_new_tokens=NEW_TOKENS), set(), VOCAB,
                       None, return_logits=True)
    cache_diffs = []
    for prompt, result in zip(batch, results):
        full = forward_logits(model, torch.tensor([prompt + result.token_ids]), None,
                              VOCAB)[0, len(prompt) - 1:-1]
        cache_diffs.append((full - result.logits).abs().max().item())
    return {"max_abs_diff": (ours - expected).abs().max().item(),
            "scale": expected.abs().max().item(),
            "ours": [r.token_ids for r in results],
            "hf": [hf_greedy(reference, p, NEW_TOKENS) for p in batch],
            "greedy_margin": greedy_margin(results),
            "cache_vs_full_max_abs_diff": max(cache_diffs),
            "logit_scale": max(r.logits.abs().max().item() for r in results)}


def main(argv=None) -> None:
    from megatron_ext.parallel import init_distributed

    path = (sys.argv[1:] if argv is None else argv)[0]
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    layout = init_distributed(tp, 1, 1234)
    report = {"tp": tp, **{name: check(name, tp, layout.tp_rank) for name in MODELS}}
    if layout.rank == 0:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
