"""Answer metrics for evaluation: SQuAD-style exact match and token F1, answer loss.

Why here: evaluating a finetuned model means comparing generated answers to
reference answers (EM/F1, as the SQuAD evaluation script defines them, so
numbers are comparable with published ones) and measuring how likely the
model finds the reference answers (mean token NLL and perplexity).

Normalisation (SQuAD v1.1/v2.0 script semantics): lowercase, drop ASCII
punctuation (``string.punctuation``; other Unicode punctuation is kept, as
there), drop the articles "a", "an", "the" as whole words, collapse
whitespace. F1 is over whitespace tokens of the normalised strings, with
multiplicity; an empty side scores 1 only against another empty side. Every
metric takes the best score over the reference answers.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Iterable[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one reference answer is needed")
    return golds


def exact_match(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised ``prediction`` equals a normalised reference, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in _golds(golds)))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Iterable[str]) -> float:
    """Best bag-of-tokens F1 of ``prediction`` against the references."""
    predicted = normalize_answer(prediction).split()
    return max(_f1(predicted, normalize_answer(gold).split()) for gold in _golds(golds))


def aggregate(predictions: Sequence[str],
              references: Sequence[str | Iterable[str]]) -> dict:
    """``{"exact_match", "f1"}`` means in [0, 1] (not percent) and ``count``.

    ``references[i]`` is prediction ``i``'s reference answer or answers.
    An empty evaluation gives NaN means.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    em = sum(exact_match(p, g) for p, g in zip(predictions, references))
    f1 = sum(token_f1(p, g) for p, g in zip(predictions, references))
    return {"exact_match": em / n if n else math.nan, "f1": f1 / n if n else math.nan,
            "count": n}


# ---------------------------------------------------------------- answer loss
def answer_nll(logits: torch.Tensor, tokens: torch.Tensor,
               target_mask: torch.Tensor) -> tuple[float, int]:
    """(sum of NLL, number) of the tokens of ``tokens`` that ``target_mask`` marks.

    ``logits`` ``[b, s, V]`` are a causal LM's outputs for ``tokens`` ``[b, s]``
    (e.g. ``generation.forward_logits``, real vocabulary), so token ``t`` is
    predicted by ``logits[:, t - 1]``; ``target_mask`` ``[b, s]`` (bool or 0/1)
    marks the answer tokens and must be False at position 0. Computed in fp32
    (at least); sums over ranks/batches add up, see :func:`loss_summary`.
    """
    mask = target_mask.bool()
    if mask[:, 0].any():
        raise ValueError("position 0 has no prediction: target_mask[:, 0] must be False")
    scores = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = torch.nn.functional.cross_entropy(scores.transpose(1, 2), tokens[:, 1:],
                                            reduction="none")
    selected = mask[:, 1:]
    return float(nll[selected].sum()), int(selected.sum())


def loss_summary(nll_sum: float, count: int) -> dict:
    """``{"loss": mean NLL, "perplexity": exp(loss), "tokens": count}``; NaN when count is 0."""
    if count <= 0:
        return {"loss": math.nan, "perplexity": math.nan, "tokens": 0}
    loss = nll_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
