"""SQuAD-style answer metrics and answer loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.inference.metrics import (
    aggregate,
    answer_nll,
    exact_match,
    loss_summary,
    normalize_answer,
    token_f1,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("the theatre, then Anthem", "theatre then anthem"),  # articles only as whole words
    ("  Tabs\tand\nnew lines  ", "tabs and new lines"),
    ("U.S.A. (1776) -- $5,000", "usa 1776 5000"),
    ("Köln & Zürich", "köln zürich"),
    ("The", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_any_reference():
    assert exact_match("The cat.", ["a cat", "dog"]) == 1.0
    assert exact_match("cats", ["a cat", "dog"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a single reference may be a string
    assert exact_match("The", ["an"]) == 1.0  # both normalise to ""
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_token_f1_hand_computed():
    # pred {cat sat on mat} vs gold {cat on mat}: 3 common, P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", ["cat on mat"]) == pytest.approx(6 / 7)
    # max over references: "red" gives P = 1/2, R = 1 -> 2/3; "blue green" gives 1/2
    assert token_f1("blue red", ["red", "blue green"]) == pytest.approx(2 / 3)
    # multiplicity: x x y vs x y y shares one x and one y: P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("Paris, France.", ["paris france"]) == 1.0
    assert token_f1("london", ["paris"]) == 0.0
    # empty after normalisation: 1 only against another empty answer
    assert token_f1("the", ["a"]) == 1.0
    assert token_f1("the", ["cat"]) == 0.0
    assert token_f1("cat", ["the"]) == 0.0


def test_aggregate_means():
    result = aggregate(["cat", "dog", "blue red"], [["a cat"], "cat", ["red", "blue green"]])
    assert result["count"] == 3
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    empty = aggregate([], [])
    assert empty["count"] == 0 and math.isnan(empty["exact_match"]) and math.isnan(empty["f1"])
    with pytest.raises(ValueError):
        aggregate(["a"], [])


def test_answer_nll_and_perplexity():
    # vocab 2; token t is predicted by the logits at t - 1
    logits = torch.tensor([[[0.0, 0.0],                              # uniform: -log 1/2
                            [math.log(0.8), math.log(0.2)],           # p(token 0) = 0.8
                            [math.log(0.25), math.log(0.75)]]])       # last: predicts nothing
    tokens = torch.tensor([[1, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    total, count = answer_nll(logits, tokens, mask)
    assert count == 2
    assert total == pytest.approx(math.log(2) - math.log(0.8))
    summary = loss_summary(total, count)
    assert summary["loss"] == pytest.approx((math.log(2) - math.log(0.8)) / 2)
    assert summary["perplexity"] == pytest.approx(math.sqrt(2 / 0.8))
    assert summary["tokens"] == 2
    # only the marked tokens count
    assert answer_nll(logits, tokens, torch.tensor([[0, 0, 1]]))[0] == pytest.approx(
        -math.log(0.8))
    with pytest.raises(ValueError):
        answer_nll(logits, tokens, torch.tensor([[True, False, False]]))
    assert math.isnan(loss_summary(0.0, 0)["loss"])


def test_answer_nll_sums_add_up_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g)
    tokens = torch.randint(0, 11, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[:, 0] = False
    whole = answer_nll(logits, tokens, mask)
    parts = [answer_nll(logits[i:i + 2], tokens[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    assert whole[1] == parts[0][1] + parts[1][1]
    assert whole[0] == pytest.approx(parts[0][0] + parts[1][0])
    expected = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert whole[0] == pytest.approx(expected[mask[:, 1:]].sum().item(), rel=1e-6)
