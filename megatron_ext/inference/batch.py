"""Generation and evaluation over many records: batching, decoding, metrics, output.

Why apart from the engine: the engine works on token ids; the tools work on
records (prompts, conversations, reference answers) and need the chat
format, the stop tokens, the decoded text and a summary. Every TP rank runs
the same calls (the engine keeps them in step); only rank 0 writes (through
:func:`megatron_ext.io.write_jsonl`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.data.chat_formats import ChatFormat
from megatron_ext.data.records import ASSISTANT, Message
from megatron_ext.errors import DataError
from megatron_ext.inference.generation import SamplingParams, forward_logits, generate
from megatron_ext.inference.loading import LoadedModel
from megatron_ext.inference.metrics import aggregate, answer_nll, exact_match, loss_summary, \
    token_f1
from megatron_ext.inference.prompts import (
    ASSISTANT_ROLE,
    PromptRecord,
    conversation_ids,
    prompt_ids,
)


@dataclass
class Generation:
    """One record's generation: a line of ``generate.py``'s output."""

    prompt: str
    generated_text: str
    generated_ids: list[int]
    prompt_tokens: int
    stop_reason: str  # stop | length

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Evaluation:
    """One record's evaluation: a line of ``evaluate.py --output``. The prediction and its
    stop reason exist when answers were generated; the scores when there are references."""

    prompt: str
    answers: list[str]
    prediction: Optional[str] = None
    stop_reason: Optional[str] = None
    exact_match: Optional[float] = None
    f1: Optional[float] = None

    def to_json(self) -> dict:
        return _without_unset(self, ("prediction", "stop_reason", "exact_match", "f1"))


@dataclass
class EvaluationSummary:
    """Answer loss and perplexity of the references and, when answers were generated,
    exact match and token F1 (in [0, 1]) over the ``scored`` records with a reference."""

    records: int
    with_reference: int
    answer_loss: float
    answer_perplexity: float
    answer_tokens: int
    exact_match: Optional[float] = None
    f1: Optional[float] = None
    scored: Optional[int] = None

    def to_json(self) -> dict:
        return _without_unset(self, ("exact_match", "f1", "scored"))


def _without_unset(result, optional: tuple[str, ...]) -> dict:
    """The result as JSON, without the optional fields that were not computed."""
    return {k: v for k, v in dataclasses.asdict(result).items()
            if v is not None or k not in optional}


def stop_ids(loaded: LoadedModel, fmt: Optional[ChatFormat]) -> set[int]:
    """End-of-turn token of the chat format, and the tokenizer's EOS."""
    tokenizer = loaded.tokenizer
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if fmt is not None and fmt.stop_token:
        ids.add(tokenizer.token_id(fmt.stop_token))
    return ids


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_records(loaded: LoadedModel, fmt: Optional[ChatFormat],
                     records: list[PromptRecord], params: SamplingParams, batch_size: int = 8,
                     progress: bool = False) -> list[Generation]:
    """One generation per record: prompt, generated text and ids, stop reason."""
    from megatron_ext.cli import ProgressBar

    tokenizer = loaded.tokenizer
    stops = stop_ids(loaded, fmt)
    limit = loaded.model_args.max_position_embeddings
    encoded = [prompt_ids(fmt, tokenizer, record) for record in records]
    too_long = [f"{record.where} ({len(ids)} tokens)" for record, ids in zip(records, encoded)
                if len(ids) + params.max_new_tokens > limit]
    if too_long:  # found before any work, not hours in
        raise DataError(f"{len(too_long)} prompt(s) + --max_new_tokens {params.max_new_tokens} "
                        f"exceed the model's {limit} positions: {', '.join(too_long[:5])}")
    bar = ProgressBar(total=len(records), desc="generating", unit="prompt",
                   enabled=progress and loaded.layout.is_logger)
    # Batches of similar prompt lengths: a batch is prefilled up to its shortest prompt and
    # then advances one position at a time, so one long prompt among short ones would cost
    # a decoding step per token of its length. The order is deterministic (stable sort).
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]))
    out: list[Optional[Generation]] = [None] * len(records)
    for batch in _batches(order, batch_size):
        prompts = [encoded[i] for i in batch]
        results = generate(loaded.model, prompts, params, stops, tokenizer.vocab_size,
                           loaded.window)
        for i, ids, result in zip(batch, prompts, results):
            text = tokenizer.decode(result.token_ids, doc_start=False,
                                    megatron_llm=bool(fmt and fmt.megatron_llm))
            out[i] = Generation(prompt=records[i].prompt, generated_text=text,
                                generated_ids=result.token_ids, prompt_tokens=len(ids),
                                stop_reason=result.stop_reason)
        bar.update(len(batch))
    bar.close()
    return out


def answer_loss(loaded: LoadedModel, fmt: ChatFormat, records: list[PromptRecord],
                batch_size: int = 8) -> dict:
    """Mean NLL and perplexity of the reference answers' tokens (assistant tokens only,
    the trainer's loss with --scalar_loss_mask 0), teacher-forced."""
    nll, count = 0.0, 0
    limit = loaded.model_args.max_position_embeddings
    scored = [r for r in records if r.answers]
    conversations = [conversation_ids(fmt, loaded.tokenizer,
                                      r.conversation + (Message(ASSISTANT, r.answers[0]),))
                     for r in scored]
    conversations = [(ids[:limit], roles[:limit]) for ids, roles in conversations]
    # batches of similar lengths (less padding); the sums do not depend on the order
    conversations.sort(key=lambda pair: len(pair[0]))
    for encoded in _batches(conversations, batch_size):
        width = max(len(ids) for ids, _ in encoded)
        tokens = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.bool)
        for row, (ids, roles) in enumerate(encoded):
            tokens[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = torch.tensor(roles) == ASSISTANT_ROLE
        mask[:, 0] = False
        logits = forward_logits(loaded.model, tokens.to(loaded.layout.device), loaded.window,
                                loaded.tokenizer.vocab_size, [len(ids) for ids, _ in encoded])
        part, n = answer_nll(logits.cpu(), tokens, mask)
        nll, count = nll + part, count + n
    return loss_summary(nll, count)


def evaluate_records(loaded: LoadedModel, fmt: ChatFormat, records: list[PromptRecord],
                     params: Optional[SamplingParams], batch_size: int = 8,
                     progress: bool = False) -> tuple[list[Evaluation], EvaluationSummary]:
    """(per-record rows, summary): answer loss/perplexity and, when ``params`` is given,
    exact match and token F1 of generated answers."""
    loss = answer_loss(loaded, fmt, records, batch_size)
    summary = EvaluationSummary(records=len(records),
                                with_reference=sum(1 for r in records if r.answers),
                                answer_loss=loss["loss"], answer_perplexity=loss["perplexity"],
                                answer_tokens=loss["tokens"])
    rows = [Evaluation(prompt=r.prompt, answers=list(r.answers)) for r in records]
    if params is not None:
        generated = generate_records(loaded, fmt, records, params, batch_size, progress)
        predictions, references = [], []
        for row, record, result in zip(rows, records, generated):
            row.prediction = result.generated_text.strip()
            row.stop_reason = result.stop_reason
            if record.answers:
                row.exact_match = exact_match(row.prediction, list(record.answers))
                row.f1 = token_f1(row.prediction, list(record.answers))
                predictions.append(row.prediction)
                references.append(list(record.answers))
        scores = aggregate(predictions, references)
        summary.exact_match, summary.f1 = scores["exact_match"], scores["f1"]
        summary.scored = scores["count"]
    return rows, summary
