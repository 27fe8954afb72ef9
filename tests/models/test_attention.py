"""``PortableAttention`` (SDPA) against megatron-core's local ``DotProductAttention``.

megatron-core needs ``torch.distributed``, ``parallel_state`` and the CPU
compatibility layer (process-wide patches and a ``TorchFunctionMode``), none
of which may leak into other tests. So every comparison runs in *one* child
process (``_child`` below, called once per module in a one-process run_many.py
worker of the session): it initialises gloo with world size 1 (unless an earlier
job there did), runs all cases and writes their max abs differences to a JSON
file; the tests here only read that file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.runs import call_job, start_runs, started, starts_early

TOL = 2e-6  # fp32, O(1) inputs: outputs and gradients

CASES = ["causal", "causal_mask_none", "one_query_mask_none", "padding", "packed", "gqa",
         "gqa_one_group", "window_causal", "window_mask_none", "window_packed",
         "window_skipped_layer", "scale_and_layer_scaling", "dropout_train", "dropout_eval",
         "fully_masked_row", "gpt_model", "gpt_model_window", "gpt_model_seeded_spec",
         "flash_glue_causal", "flash_glue_mask_none", "flash_glue_window",
         "flash_glue_window_mask_none"]


# ---------------------------------------------------------------- child process
def _compare(make_ref, make_new, mask, *, s=12, b=2, np_=4, ng=4, hn=8, train=False,
             rows=None, seed=0, sq=None):
    """Max abs differences of output and q/k/v gradients between two core attentions.

    ``mask`` is given to both, or is a pair (mask for the first, mask for the second).
    """
    masks = mask if isinstance(mask, tuple) else (mask, mask)
    import torch
    from megatron.core import tensor_parallel

    sq = s if sq is None else sq  # sq < s: queries at the end (a KV cache)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(s, b, ng, hn, generator=gen)
    v = torch.randn(s, b, ng, hn, generator=gen)
    q = torch.randn(s, b, np_, hn, generator=gen)[s - sq:]
    proj = torch.randn(s, b, np_ * hn, generator=gen)[s - sq:]
    if rows is not None:  # compare only these query positions [s, b]
        proj = proj * rows[:, :, None]
    tracker = tensor_parallel.get_cuda_rng_tracker()
    rng = tracker.get_states()
    results = []
    for make, mask in zip((make_ref, make_new), masks):
        module = make()
        module.train(train)
        tracker.set_states(dict(rng))  # the same dropout stream for both (set_states aliases)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = module(*leaves, mask)
        assert out.shape == (sq, b, np_ * hn), out.shape
        (out * proj).sum().backward()
        out = out.detach() if rows is None else out.detach() * rows[:, :, None]
        results.append([out] + [t.grad for t in leaves])
    diffs = [(x - y).abs().max().item() for x, y in zip(*results)]
    return {"out": diffs[0], "grad": max(diffs[1:]),
            "scale": results[0][0].abs().max().item()}


def _child(out_path: str) -> None:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models.attention import PortableAttention, _flash_eligible
    from megatron_ext.models.masks import attention_mask
    from megatron_ext.parallel import init_distributed

    # gloo at world size 1 (kept from an earlier job of the worker), the CPU compat layer,
    # TP = PP = 1 and every seed (torch's and megatron-core's RNG tracker) at 1234
    init_distributed(1, 1, 1234)
    s = 12

    def config(np_=4, ng=4, hn=8, **kw):
        return TransformerConfig(num_layers=4, hidden_size=np_ * hn, num_attention_heads=np_,
                                 num_query_groups=ng, attention_dropout=kw.pop("dropout", 0.0),
                                 masked_softmax_fusion=False, **kw)

    def pair(cfg, layer=1, **kw):
        args = dict(layer_number=layer, attn_mask_type=AttnMaskType.causal,
                    attention_type="self", **kw)
        return (lambda: DotProductAttention(cfg, **args), lambda: PortableAttention(cfg, **args))

    def portable(cfg):
        return lambda: PortableAttention(cfg, 1, AttnMaskType.causal, "self")

    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    # padded: 3 and 1 padding positions; packed row 1: two samples and 2 padding positions
    padded = torch.tensor([[1] * 9 + [0] * 3, [1] * 11 + [0] * 1])
    packed = torch.tensor([[1] * 9 + [0] * 3, [1] * 5 + [2] * 5 + [0] * 2])
    res = {}
    res["causal"] = _compare(*pair(config()), causal)
    res["causal_mask_none"] = _compare(*pair(config()), None)
    res["one_query_mask_none"] = _compare(*pair(config()), None, sq=1)
    res["padding"] = _compare(*pair(config()), attention_mask(padded))
    res["packed"] = _compare(*pair(config()), attention_mask(packed))
    res["gqa"] = _compare(*pair(config(ng=2)), attention_mask(packed), ng=2)
    res["gqa_one_group"] = _compare(*pair(config(np_=4, ng=1)), attention_mask(packed), ng=1)

    # window (left 3): megatron's local path uses the window mask *instead of* the given one
    win = config(window_size=(3, 0))
    res["window_causal"] = _compare(*pair(win), causal)
    res["window_mask_none"] = _compare(*pair(win), None)
    # with a packed mask we AND the window in: that equals megatron with no window given
    # the trainer's windowed mask (window = left + 1 tokens)
    def local():
        return DotProductAttention(config(), 1, AttnMaskType.causal, "self")

    res["window_packed"] = _compare(local, pair(win)[1],
                                    (attention_mask(packed, window=4), attention_mask(packed)))
    # ... while megatron's own windowed layer, given the packed mask, lets segments mix
    res["window_packed"]["upstream_drops_mask"] = _compare(
        local, pair(win)[0], (attention_mask(packed, window=4), attention_mask(packed)))["out"]
    res["window_skipped_layer"] = _compare(
        *pair(config(window_size=(3, 0), window_attn_skip_freq=2), layer=2),
        attention_mask(packed))

    res["scale_and_layer_scaling"] = _compare(
        *pair(config(apply_query_key_layer_scaling=True), layer=3, softmax_scale=0.3),
        attention_mask(packed))
    drop = config(dropout=0.3)
    res["dropout_train"] = _compare(*pair(drop), attention_mask(packed), train=True)
    res["dropout_train"]["train_vs_eval"] = _compare(
        pair(drop)[1], pair(config())[1], attention_mask(packed), train=True)["out"]
    res["dropout_eval"] = _compare(pair(config())[0], pair(drop)[1], attention_mask(packed))

    # a fully masked query row (never built by the trainer): upstream gives the mean of v
    # over all keys (every score filled with -10000), SDPA gives zeros; compare the rest
    full = attention_mask(packed).clone()
    full[1, 0, 4, :] = True
    rows = torch.ones(s, 2)
    rows[4, 1] = 0
    res["fully_masked_row"] = _compare(*pair(config()), full, rows=rows)
    res["fully_masked_row"]["whole_output"] = _compare(*pair(config()), full)["out"]

    res["gpt_model"] = _gpt_models(config_kwargs={}, mask=attention_mask(packed))
    res["gpt_model_window"] = _gpt_models(config_kwargs={"window_size": (3, 0)},
                                          mask=causal.expand(2, 1, s, s))
    res["gpt_model_seeded_spec"] = _gpt_models(config_kwargs={}, mask=attention_mask(packed),
                                               seeded=True)

    # negative controls: the masks and the window do change the output
    res["sensitivity"] = {
        "packed_vs_causal": _compare(portable(config()), portable(config()),
                                     (causal, attention_mask(packed)))["out"],
        "padded_vs_causal": _compare(portable(config()), portable(config()),
                                     (causal, attention_mask(padded)))["out"],
        "window_vs_causal": _compare(portable(config()), portable(win), causal)["out"],
    }

    res.update(_flash_glue(pair, config, causal, attention_mask(packed)))

    # the CUDA fast path is never taken (nor flash_attn imported) on CPU
    module = PortableAttention(config(), 1, AttnMaskType.causal, "self")
    res["cpu_never_flash"] = {
        "eligible": _flash_eligible(module, torch.zeros(s, 2, 4, 8, dtype=torch.bfloat16),
                                    torch.zeros(s, 2, 4, 8, dtype=torch.bfloat16), None),
        "flash_attn_imported": "flash_attn" in sys.modules}
    Path(out_path).write_text(json.dumps(res))


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1)):
    """flash_attn_func's documented semantics on SDPA: [b, s, n, hn], bottom-right aligned."""
    import torch
    import torch.nn.functional as F

    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None]
    left, right = window_size[0], 0 if causal else window_size[1]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
    return out.transpose(1, 2)


def _flash_glue(pair, config, causal, packed_mask):
    """The CUDA fast path's glue (layouts, causal/window arguments, mask check) on CPU,
    with a stand-in for ``flash_attn_func``; flash_attn itself cannot run here."""
    from megatron_ext.models import attention

    class FlashOnCpu(attention.PortableAttention):
        def _sdpa(self, query, key, value, attention_mask, dropout_p, sq, sk):
            assert attention._flash_mask_ok(self, attention_mask, sq, sk)
            return attention._flash_attention(self, query, key, value, attention_mask,
                                              dropout_p)

    saved = dict(attention._FLASH)
    attention._FLASH.update(checked=True, func=_fake_flash_attn_func)
    try:
        res = {}
        for name, cfg, mask in (("flash_glue_causal", config(ng=2), causal),
                                ("flash_glue_mask_none", config(ng=2), None),
                                ("flash_glue_window", config(ng=2, window_size=(3, 0)), causal),
                                ("flash_glue_window_mask_none",
                                 config(ng=2, window_size=(3, 0)), None)):
            ref, _ = pair(cfg)
            res[name] = _compare(ref, lambda: FlashOnCpu(cfg, 1, attention.AttnMaskType.causal,
                                                         "self"), mask, ng=2)
        causal_b = causal.expand(2, 1, 12, 12).clone()
        verdicts = [attention._is_plain_causal(causal_b, 12, 12),
                    attention._is_plain_causal(causal_b, 12, 12),  # cached
                    attention._is_plain_causal(packed_mask, 12, 12)]
        causal_b[1, 0, 11, 0] = True  # in place: the cached verdict must not be reused
        verdicts.append(attention._is_plain_causal(causal_b, 12, 12))
        res["flash_causal_check"] = verdicts
        return res
    finally:
        attention._FLASH.update(saved)


def _gpt_models(config_kwargs, mask, s=12, b=2, vocab=128, seeded=False):
    """Tiny Llama-like GPTModels, local spec vs portable spec: max abs logits/grad diffs.

    ``seeded``: the trainer's ``builder.layer_spec`` (per-layer seeding) against
    ``use_portable_attention`` applied to it, as the builder would wire it.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models import builder
    from megatron_ext.models.attention import (
        PortableAttention,
        portable_layer_spec,
        use_portable_attention,
    )

    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, perform_initialization=True,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, **config_kwargs)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    positions = torch.arange(s).expand(b, s)
    proj = torch.randn(b, s, vocab, generator=gen)
    outs = []
    if seeded:
        specs = (builder.layer_spec(cfg, 5), use_portable_attention(builder.layer_spec(cfg, 5)))
    else:
        specs = (get_gpt_layer_local_spec(normalization="RMSNorm"),
                 portable_layer_spec("RMSNorm"))
    for spec in specs:
        torch.manual_seed(7)
        model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=vocab,
                         max_sequence_length=s, position_embedding_type="rope",
                         share_embeddings_and_output_weights=False)
        logits = model(tokens, positions, mask)
        (logits * proj).sum().backward()
        outs.append((logits.detach(), dict(model.named_parameters()), model))
    (ref, ref_params, ref_model), (new, new_params, new_model) = outs
    cores = [type(m.self_attention.core_attention) for m in new_model.decoder.layers]
    layers = [[type(m).__qualname__ for m in model.decoder.layers]
              for model in (ref_model, new_model)]
    return {
        "out": (ref - new).abs().max().item(),
        # relative to each parameter's largest gradient (up to ~40 here; abs diffs ~6e-6)
        "grad": max(((ref_params[n].grad - p.grad).abs().max()
                     / ref_params[n].grad.abs().max()).item() for n, p in new_params.items()),
        "grad_abs": max((ref_params[n].grad - p.grad).abs().max().item()
                        for n, p in new_params.items()),
        "grad_scale": max(p.grad.abs().max().item() for p in ref_params.values()),
        "init": max((ref_params[n] - p).abs().max().item() for n, p in new_params.items()),
        "same_names": sorted(ref_params) == sorted(new_params),
        "portable": all(c is PortableAttention for c in cores),
        "same_layer_class": layers[0] == layers[1],
        "local_spec_untouched": get_gpt_layer_local_spec(normalization="RMSNorm")
        .submodules.self_attention.submodules.core_attention.__name__ == "DotProductAttention",
        "scale": ref.abs().max().item(),
    }


# ----------------------------------------------------------------- test process
@starts_early("results")
def start_attention_checks(request):
    directory = request.getfixturevalue("tmp_path_factory").mktemp("attention")
    out = directory / "results.json"
    return start_runs(1, [call_job("attention", "tests.models.test_attention:_child",
                                   str(out))], directory, early=True), out


@pytest.fixture(scope="module")
def results(request):
    launch, out = started("results", request)
    launch.wait()
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_matches_dot_product_attention(results, case):
    r = results[case]
    assert r["scale"] > 0.1  # the compared tensors are not trivially zero
    assert r["out"] < TOL, r
    assert r["grad"] < TOL, r


def test_cases_are_sensitive(results):
    r = results["sensitivity"]
    assert r["packed_vs_causal"] > 1e-2 and r["window_vs_causal"] > 1e-2, r
    # padding only changes the padded rows (they attend to themselves alone)
    assert r["padded_vs_causal"] > 1e-2, r


def test_window_is_anded_with_the_given_mask(results):
    # "window_packed" (parametrized above): PortableAttention(window) given the packed mask
    # == DotProductAttention(no window) given the trainer's windowed packed mask. But
    # megatron-core 0.16.1's local path *replaces* a given mask by its window mask:
    assert results["window_packed"]["upstream_drops_mask"] > 1e-2


def test_dropout_is_applied_only_in_training(results):
    # dropout_train: same tracker state -> the very dropout mask upstream draws
    assert results["dropout_train"]["train_vs_eval"] > 1e-2
    assert results["dropout_eval"]["out"] < TOL


def test_fully_masked_rows_differ_only_there(results):
    # upstream averages v over all keys, SDPA returns zeros; every other row matches
    assert results["fully_masked_row"]["whole_output"] > 1e-2


def test_gpt_model_spec(results):
    for case in ("gpt_model", "gpt_model_window", "gpt_model_seeded_spec"):
        r = results[case]
        assert r["init"] == 0.0 and r["same_names"], r
        assert r["portable"] and r["local_spec_untouched"] and r["same_layer_class"], r


def test_cpu_never_takes_the_flash_path(results):
    assert results["cpu_never_flash"] == {"eligible": False, "flash_attn_imported": False}


def test_flash_path_mask_check(results):
    # causal -> True, same mask again (cached) -> True, packed -> False, causal edited -> False
    assert results["flash_causal_check"] == [True, True, False, False]
