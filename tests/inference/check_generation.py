"""Child process for test_generation.py: our generation vs ``transformers`` ``generate``.

  python check_generation.py OUT.json              (world size 1: TP=1)
  torchrun --nproc_per_node 2 check_generation.py OUT.json   (TP=2)

(test_generation.py calls ``main([OUT.json])`` in the session's run_many.py workers.)

For tiny random Llama (GQA) and Mistral (sliding window 8, shorter than
prompt + generation) models of ``tests/models/check_hf_logits.py``'s shape,
initialised with std 0.2 (std 0.02 gives near-uniform logits whose top-2 gap
can be ~1e-6, too close to rounding for a token-exact comparison; 0.2 gives
gaps >= ~3e-3 and varied, non-repeating continuations), converted into
our model at TP = world size (each rank slices the unsharded converted
weights itself), it runs every generation check and rank 0 writes the raw
outcomes to OUT.json; the assertions live in the test file.
"""

import json
import os
import sys
import time

import torch

from megatron_ext.inference.generation import SamplingParams, forward_logits, generate
from megatron_ext.models.hf_llama import llama_to_megatron
from megatron_ext.parallel import init_distributed
from tests.models.check_hf_logits import PADDED, SHAPE, VOCAB, our_model

NEW_TOKENS = 24
PROMPT_LENGTHS = (7, 13, 4)
PROMPT_SEED = 5
INIT_STD = 0.2


def hf_model(family: str, window=8):
    import transformers

    torch.manual_seed(0)
    if family == "mistral":
        config = transformers.MistralConfig(**SHAPE, sliding_window=window,
                                            initializer_range=INIT_STD)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**SHAPE, initializer_range=INIT_STD)
        model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def tp_slice(full: dict, model, tp: int, rank: int) -> dict:
    """This TP rank's part of an unsharded megatron state dict (``full``) for ``model``."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is None or tp == 1 or not getattr(param, "tensor_model_parallel", False):
            out[name] = tensor
            continue
        dim = param.partition_dim
        if name.endswith("linear_fc1.weight") and model.config.gated_linear_unit:
            # each rank holds [its gate rows; its up rows]
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        else:
            out[name] = tensor.chunk(tp, dim=dim)[rank]
        assert out[name].shape == param.shape, (name, out[name].shape, param.shape)
    return out


def hf_greedy(reference, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_left_padded(reference, batch: list[list[int]], new_tokens: int):
    """``transformers``' own batched generation: left padding and an attention mask."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def greedy_margin(results) -> float:
    """Smallest gap between the best and second-best logit over all greedy steps."""
    gaps = [torch.topk(r.logits, 2, dim=-1).values for r in results]
    return min((g[:, 0] - g[:, 1]).min().item() for g in gaps)


def ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def check_family(family: str, tp: int, rank: int) -> dict:
    """All checks at TP=1; at TP>1 the ones where TP matters (fewer runs: gloo is slow)."""
    every = tp == 1
    reference = hf_model(family)
    model, args = our_model(family, tp)
    window = args.sliding_window_size
    full = llama_to_megatron(reference.state_dict(), 2, 4, 2, VOCAB, PADDED)
    missing, unexpected = model.load_state_dict(tp_slice(full, model, tp, rank), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    batch = prompts()
    out: dict = {"timings": {}}

    def run(name, batch_prompts, params, stop=(), **kwargs):
        start = time.perf_counter()
        results = generate(model, batch_prompts, params, set(stop), VOCAB, window, **kwargs)
        out["timings"][name] = round(time.perf_counter() - start, 3)
        return results

    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    batched = run("greedy_batched", batch, greedy, return_logits=True)
    out["ours"] = ids(batched)
    out["reasons"] = [r.stop_reason for r in batched]
    if every:
        out["alone"] = [ids(run(f"greedy_alone_{i}", [p], greedy))[0]
                        for i, p in enumerate(batch)]
    out["hf"] = [hf_greedy(reference, p, NEW_TOKENS) for p in batch]
    if every:
        out["hf_batched"] = hf_greedy_left_padded(reference, batch, NEW_TOKENS)
    out["greedy_margin"] = greedy_margin(batched)

    out["cache_vs_full_max_abs_diff"] = cache_vs_full(model, batch, batched, window)
    out["logit_scale"] = max(r.logits.abs().max().item() for r in batched)

    if every:  # a right-padded batch through forward_logits equals its rows alone
        rows = [p + r.token_ids for p, r in zip(batch, batched)]
        width = max(map(len, rows))
        padded = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        together = forward_logits(model, padded, window, VOCAB, lengths=list(map(len, rows)))
        out["padded_forward_max_abs_diff"] = max(
            (together[i, :len(row)] - forward_logits(model, torch.tensor([row]), window,
                                                     VOCAB)[0]).abs().max().item()
            for i, row in enumerate(rows))
        try:
            generate(model, batch, greedy, set(), VOCAB, window=5)
            out["wrong_window_refused"] = False
        except ValueError:
            out["wrong_window_refused"] = True

    if every and family == "mistral":  # the window must change the generated tokens
        unwindowed = hf_model(family, window=None)
        out["hf_without_window"] = [hf_greedy(unwindowed, p, NEW_TOKENS) for p in batch]

    # stop token: the 3rd greedy token of prompt 0
    stop_id = out["ours"][0][2]
    stopped = run("stop", batch, greedy, stop=(stop_id, VOCAB + 5))
    out["stop"] = {"id": stop_id, "ids": ids(stopped), "reasons": [r.stop_reason for r in stopped],
                   "tokens": [r.stop_token for r in stopped]}

    # sampling
    def sampling(**kw):
        return SamplingParams(max_new_tokens=NEW_TOKENS, greedy=False, **kw)

    seed7 = sampling(temperature=1.0, seed=7)
    out["sample_a"] = ids(run("sample_a", batch, seed7))
    if not every:
        return finish(out, model, batch, window)
    out["top_k_p"] = ids(run("top_k_p", batch, sampling(temperature=1.5, top_k=20, top_p=0.9,
                                                        seed=3)))
    out["sample_b"] = ids(run("sample_b", batch, seed7))
    out["sample_other_seed"] = ids(run("sample_c", batch, sampling(temperature=1.0, seed=8)))
    # a row's sample does not depend on the rest of the batch
    out["sample_row0_alone"] = ids(run("sample_alone", [batch[0]], seed7))[0]
    other = [batch[2] + batch[2], batch[1]]  # another row 0, of another length
    out["sample_row1_other_batch"] = ids(run("sample_other_batch", other, seed7))[1]
    out["tiny_temperature"] = ids(run("tiny_t", batch, sampling(temperature=1e-5, seed=3)))
    out["top_k_1"] = ids(run("top_k_1", batch, sampling(temperature=2.0, top_k=1, seed=3)))
    out["top_p_tiny"] = ids(run("top_p_tiny", batch, sampling(temperature=2.0, top_p=1e-6,
                                                             seed=3)))
    return finish(out, model, batch, window)


def cache_vs_full(model, batch, results, window) -> float:
    """Largest difference of KV-cache step logits and a full forward over prompt + generation."""
    diffs = []
    for prompt, result in zip(batch, results):
        sequence = torch.tensor([prompt + result.token_ids])
        full_logits = forward_logits(model, sequence, window, VOCAB)[0, len(prompt) - 1:-1]
        diffs.append((full_logits - result.logits).abs().max().item())
    return max(diffs)


def finish(out: dict, model, batch, window) -> dict:
    """Last, the fp64 cache check (converts ``model``); then ``ranks_agree``."""
    import torch.distributed as dist

    # in fp64, any cache/position/mask error shows up far above rounding
    model.double()
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    results = generate(model, batch, greedy, set(), VOCAB, window, return_logits=True)
    out["fp64_ours"] = ids(results)
    out["fp64_cache_vs_full_max_abs_diff"] = cache_vs_full(model, batch, results, window)
    mine = {k: v for k, v in out.items() if k != "timings"}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, json.dumps(mine, sort_keys=True))
    out["ranks_agree"] = all(g == gathered[0] for g in gathered)
    return out


def check_variant(family: str, tp: int, rank: int) -> dict:
    """Tied Llama, Qwen2, Qwen3 (``check_hf_logits.VARIANTS``): greedy tokens vs transformers
    and the KV cache vs a full forward (the sampling and stop checks do not depend on the
    architecture and run for Llama and Mistral)."""
    import torch.distributed as dist

    from tests.models.check_hf_logits import hf_model as variant_model
    from tests.models.check_hf_logits import to_megatron

    reference = variant_model(family, initializer_range=INIT_STD)
    model, _ = our_model(family, tp)
    full = to_megatron(family, reference.state_dict())
    missing, unexpected = model.load_state_dict(tp_slice(full, model, tp, rank), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    batch = prompts()
    results = generate(model, batch, SamplingParams(max_new_tokens=NEW_TOKENS), set(), VOCAB,
                       None, return_logits=True)
    out = {"ours": ids(results), "hf": [hf_greedy(reference, p, NEW_TOKENS) for p in batch],
           "greedy_margin": greedy_margin(results),
           "cache_vs_full_max_abs_diff": cache_vs_full(model, batch, results, None),
           "logit_scale": max(r.logits.abs().max().item() for r in results)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out["ours"])
    out["ranks_agree"] = all(g == gathered[0] for g in gathered)
    return out


def main(argv=None) -> None:
    path = (sys.argv[1:] if argv is None else argv)[0]
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    layout = init_distributed(tp, 1, 1234)
    start = time.perf_counter()
    report = {"tp": tp}
    for family in ("llama", "mistral"):
        report[family] = check_family(family, tp, layout.tp_rank)
    from tests.models.check_hf_logits import VARIANTS

    for family in VARIANTS:
        report[family] = check_variant(family, tp, layout.tp_rank)
    report["seconds"] = round(time.perf_counter() - start, 2)
    if layout.rank == 0:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
