"""A checkpoint of the Hugging Face backend as a model for generation and evaluation.

Why a wrapper: ``generation.py`` and ``batch.py`` call a model as megatron-core's
``GPTModel`` is called (token ids, position ids, the training mask, an inference
context whose KV cache the model fills); :class:`HFCausalLM` answers that call with the
transformers model: a full causal forward without a context (the rows are right-padded,
so the causal mask is the training one for every real position; a model with a sliding
window applies its own), and with one, transformers' own ``DynamicCache`` kept for that
context.
"""

from __future__ import annotations

from typing import Optional

import torch


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM behind megatron-core's ``GPTModel`` call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model
        self._cache = (None, None)  # (the inference context, its cache): one at a time

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, inference_context=None,
                runtime_gather_output: bool = True) -> torch.Tensor:
        if inference_context is None:
            return self.hf(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
        from transformers import DynamicCache

        context, cache = self._cache
        if context is not inference_context or inference_context.sequence_len_offset == 0:
            cache = DynamicCache(config=self.hf.config)
            self._cache = (inference_context, cache)
        return self.hf(input_ids=tokens, position_ids=position_ids, past_key_values=cache,
                       use_cache=True).logits
