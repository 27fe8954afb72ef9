"""Generation with megatron-core's KV cache: parity with ``transformers``, cache, stop, sampling.

The model checks need megatron-core's process groups and the CPU compat layer,
which must not leak into other tests, so they run in the session's run_many.py
workers (``check_generation.py``'s ``main``): once at TP=1 (world size 1) and once
at TP=2 (2 processes), handed over together once per module when the selected
tests need both; the tests here assert on their JSON reports. The sampling
filters are tested in-process.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.inference.generation import (
    GenerationResult,
    SamplingParams,
    choose_tokens,
    filter_logits,
    generate,
    row_seed,
)
from tests.inference.check_generation import NEW_TOKENS, PROMPT_LENGTHS
from tests.runs import call_job, start_runs, started, starts_early

FAMILIES = ["llama", "mistral"]
WINDOW = 8  # Mistral's sliding window in check_generation.py
WORLD = {"tp1": 1, "tp2": 2}


@starts_early("generation_checks")
def start_generation_checks(request) -> dict:
    """{"tp1" / "tp2": its started check and report file}, for those the selected tests
    need: the TP=1 check (one process) runs beside the TP=2 one (two)."""
    directory = request.getfixturevalue("tmp_path_factory").mktemp("generation")
    wanted = {name for item in request.session.items
              for name in WORLD if name in getattr(item, "fixturenames", ())}
    return {name: (start_runs(WORLD[name], [call_job(
        name, "tests.inference.check_generation:main", [str(directory / f"{name}.json")])],
        directory / name, early=True), directory / f"{name}.json") for name in sorted(wanted)}


@pytest.fixture(scope="module")
def generation_checks(request) -> dict:
    return started("generation_checks", request)


def _report(checks: dict, name: str) -> dict:
    launch, out = checks[name]
    launch.wait()
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def tp1(generation_checks):
    return _report(generation_checks, "tp1")


@pytest.fixture(scope="module")
def tp2(generation_checks):
    return _report(generation_checks, "tp2")


def _truncated_at(tokens: list[int], stop: int) -> list[int]:
    return tokens[:tokens.index(stop)] if stop in tokens else tokens


# ------------------------------------------------------------ model: TP = 1
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_equals_transformers_and_each_prompt_alone(tp1, family):
    r = tp1[family]
    assert r["ours"] == r["hf"]  # transformers, one prompt at a time
    assert r["ours"] == r["hf_batched"]  # transformers, left-padded batch
    assert r["ours"] == r["alone"]  # batching (prompts of 7, 13, 4 tokens) changes nothing
    assert r["reasons"] == ["length"] * len(PROMPT_LENGTHS)
    for tokens in r["ours"]:
        assert len(tokens) == NEW_TOKENS and len(set(tokens)) >= 8  # non-trivial continuations
    # the comparison is meaningful: no near-tie between the two best tokens at any step
    assert r["greedy_margin"] > 1e-4


def test_sliding_window_is_active_during_decode(tp1):
    r = tp1["mistral"]
    assert max(PROMPT_LENGTHS) + NEW_TOKENS > 3 * WINDOW
    # the same weights without the window generate other tokens, and we match the windowed ones
    assert r["hf_without_window"] != r["hf"]
    assert r["ours"] == r["hf"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_logits_equal_full_recompute(tp1, family):
    r = tp1[family]
    # fp32: rounding only (logits here are O(7), so 1e-5 relative to their scale)
    assert r["cache_vs_full_max_abs_diff"] < 1e-5 * max(1.0, r["logit_scale"]), r
    # fp64: any position, mask or cache error would be far above this
    assert r["fp64_cache_vs_full_max_abs_diff"] < 1e-10, r
    assert r["fp64_ours"] == r["ours"]
    # forward_logits on a right-padded batch equals its rows alone
    assert r["padded_forward_max_abs_diff"] < 1e-5 * max(1.0, r["logit_scale"])
    assert r["wrong_window_refused"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_a_stop_token(tp1, family):
    r = tp1[family]
    stop = r["stop"]
    assert stop["id"] == r["ours"][0][2]
    assert stop["ids"][0] == r["ours"][0][:2]  # excluded from token_ids
    assert stop["reasons"][0] == "stop" and stop["tokens"][0] == stop["id"]
    for i in range(1, len(PROMPT_LENGTHS)):  # other rows are unaffected until they hit it
        assert stop["ids"][i] == _truncated_at(r["ours"][i], stop["id"])
        hit = stop["id"] in r["ours"][i]
        assert stop["reasons"][i] == ("stop" if hit else "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_seeded_and_limits_to_greedy(tp1, family):
    r = tp1[family]
    greedy = r["ours"]
    assert r["sample_a"] == r["sample_b"]  # same seed, same tokens
    assert r["sample_other_seed"] != r["sample_a"]
    assert r["sample_a"] != greedy
    # a row's sample depends only on its prompt, row index and seed
    assert r["sample_row0_alone"] == r["sample_a"][0]
    assert r["sample_row1_other_batch"] == r["sample_a"][1]
    # degenerate settings reduce to greedy
    assert r["tiny_temperature"] == greedy
    assert r["top_k_1"] == greedy
    assert r["top_p_tiny"] == greedy
    assert r["top_k_p"] != greedy
    for tokens in r["sample_a"] + r["top_k_p"]:
        assert len(tokens) == NEW_TOKENS and all(0 <= t < 300 for t in tokens)


# ------------------------------------------------------------ model: TP = 2
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_generation_matches_transformers_and_tp1(tp1, tp2, family):
    r, one = tp2[family], tp1[family]
    assert tp2["tp"] == 2
    assert r["ranks_agree"]  # both TP ranks returned the very same tokens
    assert r["ours"] == r["hf"] == one["ours"]
    assert r["cache_vs_full_max_abs_diff"] < 1e-5 * max(1.0, r["logit_scale"]), r
    assert r["fp64_cache_vs_full_max_abs_diff"] < 1e-10, r
    assert r["stop"] == one["stop"]
    # the seeded draws do not depend on TP either
    assert r["sample_a"] == one["sample_a"]


# ------------------------------------------------------------ tied Llama, Qwen2, Qwen3
@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen3"])
def test_tied_and_qwen_greedy_generation_equals_transformers(tp1, family):
    r = tp1[family]
    assert r["ours"] == r["hf"]
    assert r["greedy_margin"] > 1e-4
    for tokens in r["ours"]:
        assert len(tokens) == NEW_TOKENS and len(set(tokens)) >= 8
    assert r["cache_vs_full_max_abs_diff"] < 1e-5 * max(1.0, r["logit_scale"]), r


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen3"])
def test_tp2_tied_and_qwen_generation_matches_transformers_and_tp1(tp1, tp2, family):
    r, one = tp2[family], tp1[family]
    assert r["ranks_agree"]
    assert r["ours"] == r["hf"] == one["ours"]
    assert r["cache_vs_full_max_abs_diff"] < 1e-5 * max(1.0, r["logit_scale"]), r


# ------------------------------------------------------------ in-process
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()

    def kept(top_p, top_k=0):
        return torch.isfinite(filter_logits(logits, top_k, top_p)).nonzero().flatten().tolist()

    assert kept(0.4) == [1]
    assert kept(0.75) == [1, 3]  # 0.5 < 0.75 <= 0.8
    assert kept(0.85) == [0, 1, 3]  # 0.8 < 0.85 <= 0.95
    assert kept(0.97) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1.0, top_k=2) == [1, 3]
    assert kept(0.4, top_k=3) == [1]
    # kept logits are unchanged; rows are filtered independently
    filtered = filter_logits(torch.stack([logits, logits.flip(0)]), 0, 0.75)
    assert torch.equal(filtered[0, [1, 3]], logits[[1, 3]])
    assert torch.isfinite(filtered[1]).nonzero().flatten().tolist() == [0, 2]


def test_top_k_keeps_ties_and_the_input_is_not_modified():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    before = logits.clone()
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [
        [False, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3)).sum() == 3
    assert torch.equal(logits, before)


def test_sampling_draws_from_the_renormalised_filtered_distribution():
    n = 2000
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(n, 4)

    def draw(seed, temperature):
        params = SamplingParams(max_new_tokens=1, greedy=False, temperature=temperature,
                                top_p=0.75)
        generators = [torch.Generator().manual_seed(row_seed(seed, i)) for i in range(n)]
        return choose_tokens(logits, params, generators)

    counts = torch.bincount(draw(0, 1.0), minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / n - 0.5 / 0.8) < 0.05  # sd ~ 0.011
    # temperature (applied before top-p) sharpens: at T=0.5 the odds 5:3 become 25:9, and
    # top-p 0.75 still keeps tokens 1 and 3 (tempered shares 0.616, 0.247, then 0.062)
    sharp = draw(1, 0.5)
    assert set(sharp.tolist()) == {1, 3}
    assert abs((sharp == 1).float().mean().item() - 25 / 34) < 0.05
    assert torch.equal(sharp, draw(1, 0.5))  # same generators, same draws


def test_greedy_choice_is_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    assert choose_tokens(logits, SamplingParams(max_new_tokens=1)).tolist() == [1, 0]


def test_row_seeds_differ_across_rows_and_seeds():
    seeds = {row_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert row_seed(7, 1) != row_seed(8, 0)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(("field", "value"), [("max_new_tokens", -1), ("temperature", 0.0),
                                             ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)])
def test_bad_sampling_params_are_refused(field, value):
    params = SamplingParams(max_new_tokens=4, greedy=False)
    setattr(params, field, value)
    with pytest.raises(ValueError):
        generate(object(), [[1, 2]], params, set(), vocab_size=10)


def test_trivial_requests_need_no_model():
    model = object()  # never called
    assert generate(model, [], SamplingParams(max_new_tokens=3), {0}, vocab_size=10) == []
    results = generate(model, [[1], [2, 3]], SamplingParams(max_new_tokens=0), {0}, 10)
    assert results == [GenerationResult([], "length")] * 2
    with pytest.raises(ValueError):
        generate(model, [[1], []], SamplingParams(max_new_tokens=3), {0}, vocab_size=10)

