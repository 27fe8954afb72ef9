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

from megatron_ext.checkpointing.hf_export import trained_model
from megatron_ext.checkpointing.run_config import load_run_config, tokenizer_config_from_run
from megatron_ext.errors import ConfigError
from megatron_ext.models.config import ModelArgs
from megatron_ext.parallel import init_distributed
from megatron_ext.tokenizers import build_tokenizer


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


def load_hf_backend(directory: str, tp: int, pp: int, seed: int,
                    vocab_file: Optional[str], bf16: bool):
    """The :class:`~megatron_ext.inference.loading.LoadedModel` of the checkpoint of the
    hf backend in ``directory`` (one process: its model is whole)."""
    from megatron_ext.inference.loading import LoadedModel

    if tp != 1 or pp != 1:
        raise ConfigError(f"{directory} is a checkpoint of the Hugging Face backend: it "
                          "generates in one process (--tensor_model_parallel_size 1)")
    run_config = load_run_config(directory)
    layout = init_distributed(1, 1, seed)
    tokenizer = build_tokenizer(tokenizer_config_from_run(directory, run_config, vocab_file))
    model = trained_model(directory, run_config)
    if bf16:
        model = model.to(torch.bfloat16)
    model.to(layout.device)
    config = model.config.get_text_config()
    args = ModelArgs(max_position_embeddings=getattr(config, "max_position_embeddings", None)
                     or 1 << 20).resolved()
    rows = model.get_input_embeddings().weight.shape[0]
    return LoadedModel(HFCausalLM(model).eval(), args, tokenizer, run_config, layout, rows)
