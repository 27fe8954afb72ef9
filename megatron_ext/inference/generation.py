"""Text generation for a megatron-core ``GPTModel`` (PP=1, any TP) with a key-value cache.

Why here: evaluation and demos need to sample answers from the models the
trainer writes, on the same megatron-core modules, at the trainer's TP
layout, and with results that match Hugging Face ``generate`` token for token.

How it works
------------
* **KV cache: megatron-core's own** ``StaticInferenceContext``. Given one,
  every ``Attention`` layer (``_adjust_key_value_for_inference``) writes the
  new keys/values at ``[sequence_len_offset : sequence_len_offset + s]`` of a
  per-layer buffer ``[max_seq, max_batch, ng, hn]`` and attends over
  ``[:sequence_len_offset + s]`` of it. Keys are cached *before* RoPE; the
  layer slices the rotary table so queries get positions
  ``sequence_len_offset + i`` and the cached keys ``0 .. end-1``. So the cache
  index *is* the position, and :func:`generate` keeps every row of the cache
  free of padding (see "batching" below).
* **Masks.** No mask tensor is passed (``attention_mask=None``). During decode
  megatron-core hands the core attention ``attn_mask_type=no_mask``;
  ``PortableAttention`` ignores that argument and decides from its own layer
  type: for one query with ``mask=None`` it attends every cached key
  (bottom-right-aligned causal = everything), and with a sliding window it
  applies the bottom-right-aligned band ``0 <= (sk-1) - j <= window-1``, i.e.
  exactly the last ``window`` keys. For the prefill (``sq == sk``) it uses the
  causal mask, intersected with the window band. Nothing has to change in
  ``PortableAttention`` for this; a core attention that *did* honour the
  ``attn_mask_type`` argument would have to apply the window itself.
* **Batching without padding** (megatron-core's static engine does the same):
  all rows are prefilled with their first ``min(len(prompt))`` tokens; then
  one token per step is fed to every row: its next prompt token while the
  row is still inside its prompt, else the token it just generated. Row
  ``i``'s cache therefore holds exactly its own tokens at their own
  positions, and its tokens are those of generating the prompt alone (up to
  float rounding of batched kernels).
* **Logits** come back gathered over TP (``runtime_gather_output=True``),
  padded-vocab wide; only ``[..., :vocab_size]`` is ever used.
* **Sampling** uses one ``torch.Generator`` per row, seeded from
  ``(params.seed, row)`` (:func:`row_seed`); a row draws once per token it
  generates, so its sample depends on its prompt, row index and seed, not on
  the other prompts of the batch (their lengths, when they stop). Under TP
  the gathered logits are identical on every TP rank, so the draws are too;
  the chosen tokens are still broadcast from the first TP rank so that the
  ranks can never disagree (and stop at the same step).

Stop tokens: a row stops at the first generated token in ``stop_ids``; that
token is **not** part of ``GenerationResult.token_ids`` (it is reported as
``stop_token``). ``max_new_tokens`` counts the stop token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_ext.models.masks import attention_mask


@dataclass
class SamplingParams:
    """How the next token is chosen.

    ``greedy`` (default) takes the arg-max and ignores the other fields but
    ``max_new_tokens``. Otherwise the real-vocab logits are divided by
    ``temperature`` (> 0), restricted to the ``top_k`` largest (0 = all), then
    to the smallest set of tokens whose probability reaches ``top_p``
    (1.0 = all), and a token is drawn from the renormalised distribution.
    """

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.greedy:
            return
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """One prompt's continuation.

    ``token_ids``: the generated tokens, *without* the stop token.
    ``stop_reason``: ``"stop"`` (a token of ``stop_ids`` was generated; it is
    ``stop_token``) or ``"length"`` (``max_new_tokens`` reached).
    ``logits``: with ``generate(..., return_logits=True)``, fp32 (fp64 models: fp64)
    ``[steps, vocab_size]``: the logits each generated token (the stop token
    included) was chosen from, before temperature and filtering.
    """

    token_ids: list[int]
    stop_reason: str
    stop_token: int | None = None
    logits: torch.Tensor | None = None


# ------------------------------------------------------------------- sampling
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` ``[..., V]`` with the tokens outside top-k / top-p set to ``-inf``.

    top-k keeps the ``top_k`` largest logits (ties with the k-th are kept);
    top-p then keeps, per row, the most probable tokens up to and including
    the first one at which the cumulative probability reaches ``top_p``
    (so the most probable token always survives). Returns a new tensor.
    """
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: list | None = None) -> torch.Tensor:
    """Next token per row of real-vocab ``logits`` ``[b, V]``: int64 ``[b]``.

    Sampling draws row ``i`` from ``generators[i]`` (one ``torch.Generator``
    per row, on ``logits.device``).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    if generators is None:
        generators = [None] * probs.shape[0]
    return torch.stack([torch.multinomial(row, 1, generator=g)[0]
                        for row, g in zip(probs, generators)])


def row_seed(seed: int, row: int) -> int:
    """Seed of row ``row``'s generator: a 63-bit mix of ``(seed, row)``.

    Not ``seed + row``, so that seed 8's row 0 does not replay seed 7's row 1.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (1 << 64)
    mixed ^= mixed >> 31
    return mixed % (1 << 63)


# -------------------------------------------------------------------- forward
def _check_model(model) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("generation needs pipeline parallel size 1")
    config = getattr(model, "config", None)
    if (config is not None and config.sequence_parallel
            and parallel_state.get_tensor_model_parallel_world_size() > 1):
        raise ValueError("generation needs sequence_parallel=False (decode feeds one token); "
                         "build the inference model without it (same weights)")


def _check_window(model, window: int | None) -> None:
    """The layers apply ``config.window_size`` themselves; ``window`` must agree with it."""
    config = getattr(model, "config", None)
    configured = getattr(config, "window_size", None)
    if window is None or configured is None:
        if window is not None:
            raise ValueError(f"window={window} but the model has no sliding window")
        return
    if tuple(configured) != (window - 1, 0):
        raise ValueError(f"window={window} disagrees with the model's window_size {configured}")


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def forward_logits(model, tokens: torch.Tensor, window: int | None = None,
                   vocab_size: int | None = None,
                   lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[b, s, vocab_size]`` (fp32, or fp64 for an fp64 model) of ``tokens`` ``[b, s]``.

    No cache: one full forward with the training mask (``models.masks.attention_mask``, window
    ``window``), gathered over TP and sliced to the real vocabulary
    (``vocab_size``; None keeps the padded one). ``lengths`` ``[b]``: rows are
    right-padded to ``s`` (padding positions get meaningless logits). With
    ``window=None`` a windowed model still applies its own window
    (``PortableAttention`` ANDs it with the mask).
    """
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device)
    if lengths is None:
        segments = torch.ones_like(tokens, dtype=torch.int32)
    else:
        lengths = torch.as_tensor(lengths, device=tokens.device)
        segments = (positions[None, :] < lengths[:, None]).to(torch.int32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(tokens, positions.expand(b, s), attention_mask(segments, window),
                           runtime_gather_output=True)
    finally:
        model.train(was_training)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return _at_least_fp32(logits)


class CachedDecoder:
    """A batch of sequences decoded incrementally through megatron-core's static KV cache.

    ``step(tokens)`` feeds ``tokens`` ``[b, n]`` (the next ``n`` positions of
    every row, ``n`` may be > 1 for a prefill) and returns fp32 (fp64) real-vocab
    logits ``[b, vocab_size]`` of the last fed position. Rows must hold no
    padding: position ``p`` of the cache is token ``p`` of the row.
    """

    def __init__(self, model, batch_size: int, max_length: int, vocab_size: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        _check_model(model)
        self.model = model
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.context = StaticInferenceContext(batch_size, max_length)

    @property
    def length(self) -> int:
        """Positions already in the cache."""
        return self.context.sequence_len_offset

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        start, n = self.length, tokens.shape[1]
        if start + n > self.max_length:
            raise ValueError(f"cache holds {self.max_length} positions, {start + n} requested")
        positions = torch.arange(start, start + n, device=tokens.device).expand_as(tokens)
        logits = self.model(tokens, positions, None, inference_context=self.context,
                            runtime_gather_output=True)
        self.context.increment_sequence_len_offset(n)
        return _at_least_fp32(logits[:, -1, :self.vocab_size])

    def enable_decode_mode(self) -> None:
        """All prompts are consumed (megatron-core's flag; only its CUDA fast paths read it)."""
        self.context.enable_decode_mode()


# ------------------------------------------------------------------- generate
def _broadcast_from_first_tp_rank(tokens: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tokens, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return tokens


def _model_device(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def generate(model, prompts: list[list[int]], params: SamplingParams, stop_ids: Iterable[int],
             vocab_size: int, window: int | None = None,
             return_logits: bool = False) -> list[GenerationResult]:
    """Continue every prompt of ``prompts`` (token ids) with ``model``; one result per prompt.

    Every TP rank must call this with the same arguments; all get the same
    results. ``window`` is the sliding window the model was built with, for
    checking only: the layers always apply their configured window (None
    accepts it; a different value raises ``ValueError``).
    See the module docstring for batching, the cache and the stop convention.
    """
    params.validate()
    _check_window(model, window)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stop = {int(t) for t in stop_ids}
    b = len(prompts)
    if b == 0:
        return []
    if params.max_new_tokens == 0:
        return [GenerationResult([], "length", logits=torch.zeros(0, vocab_size)
                                 if return_logits else None) for _ in prompts]

    device = _model_device(model)
    lengths = [len(p) for p in prompts]
    shortest, total = min(lengths), max(lengths) + params.max_new_tokens
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    generators = None
    if not params.greedy:
        generators = [torch.Generator(device=device).manual_seed(row_seed(params.seed, i))
                      for i in range(b)]

    outputs: list[list[int]] = [[] for _ in prompts]
    step_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * b
    stop_tokens: list[int | None] = [None] * b

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            decoder = CachedDecoder(model, b, total, vocab_size)
            logits = decoder.step(tokens[:, :shortest])
            position = shortest  # the position whose token is chosen now
            while True:
                rows = [i for i in range(b) if lengths[i] <= position and reasons[i] is None]
                if rows:
                    index = torch.tensor(rows, device=device)
                    row_generators = None if generators is None else [generators[i] for i in rows]
                    chosen = choose_tokens(logits[index], params, row_generators)
                    chosen = _broadcast_from_first_tp_rank(chosen.to(torch.long).contiguous())
                    tokens[index, position] = chosen
                    for j, i in enumerate(rows):
                        token = int(chosen[j])
                        if return_logits:
                            step_logits[i].append(logits[i].cpu())
                        if token in stop:
                            reasons[i], stop_tokens[i] = "stop", token
                        else:
                            outputs[i].append(token)
                            if len(outputs[i]) == params.max_new_tokens:
                                reasons[i] = "length"
                if all(r is not None for r in reasons):
                    break
                if position >= max(lengths):
                    decoder.enable_decode_mode()
                logits = decoder.step(tokens[:, position:position + 1])
                position += 1
    finally:
        model.train(was_training)

    return [GenerationResult(outputs[i], reasons[i], stop_tokens[i],
                             torch.stack(step_logits[i]) if return_logits else None)
            for i in range(b)]
