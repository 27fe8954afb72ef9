"""A trained or converted checkpoint as a model ready for inference, at any TP/PP.

Why one function: generation, evaluation and the logits checks of the
converters all need the same steps (run config -> model shape, tokenizer
from the checkpoint's own files when it carries them, vocabulary padding,
weights-only load), and they must agree with how the trainer built the
model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.checkpointing import (
    TrainState,
    load_checkpoint,
    read_run_config,
)
from megatron_ext.checkpointing.adapters import adapter_run_config, base_of
from megatron_ext.checkpointing.dcp import hf_backend_checkpoint
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.vocab import padded_vocab_for
from megatron_ext.errors import ConfigError
from megatron_ext.models.builder import build_gpt_model, transformer_config
from megatron_ext.models.config import ModelArgs, PrecisionArgs
from megatron_ext.tokenizers import InstructTokenizer, build_tokenizer
from megatron_ext.models.masks import attention_mask
from megatron_ext.parallel import Layout, ModelShape, ParallelArgs, init_distributed


@dataclass
class LoadedModel:
    model: torch.nn.Module
    model_args: ModelArgs  # resolved: every family default filled in
    tokenizer: InstructTokenizer
    run_config: dict
    layout: Layout
    padded_vocab: int

    @property
    def window(self) -> Optional[int]:
        return self.model_args.mask_window


def load_for_inference(load: str, tp: int = 1, pp: int = 1, seed: int = 1234,
                       vocab_file: Optional[str] = None, bf16: bool = False,
                       ep: int = 1) -> LoadedModel:
    """Build the checkpoint's model for this process's TP/PP rank and load its weights.

    The weights are not randomly initialised first (the checkpoint sets every
    one); ``bf16`` builds the model in bfloat16 (half the memory of fp32); ``ep``: a
    mixture of experts' experts split over that many expert-parallel ranks.
    """
    if not os.path.isdir(load):
        raise ConfigError(f"--load {load} does not exist")
    native = hf_backend_checkpoint(load)
    if native is not None:  # the Hugging Face backend's: transformers' model
        return _load_hf_backend(native, tp, pp, seed, vocab_file, bf16)
    run_config = adapter_run_config(load)
    weights = load  # where the (base) weights are
    if run_config is not None:  # LoRA/DoRA adapters: their recorded base, checked
        weights = base_of(run_config, load)
    else:
        run_config = read_run_config(load)
    model_args = ModelArgs.from_dict(run_config["model"]).resolved()
    parallel = ParallelArgs(tp, pp, expert_model_parallel_size=ep)
    problems = parallel.problems(int(os.environ.get("WORLD_SIZE", "1")),
                                 model=ModelShape.of(**{**run_config["model"],
                                                        "num_experts": model_args.experts}))
    if problems:
        raise ConfigError(f"{load} cannot run at TP {tp} x PP {pp}"
                          + (f" x EP {ep}" if ep > 1 else "") + ": " + "; ".join(problems))
    layout = init_distributed(tp, pp, seed, ep=ep)
    tokenizer = build_tokenizer(tokenizer_config_from_run(weights, run_config, vocab_file))
    padded = padded_vocab_for(weights, tokenizer.vocab_size,
                              model_args.make_vocab_size_divisible_by, tp)
    config = transformer_config(model_args, parallel, PrecisionArgs(bf16=bf16),
                                init_weights=False)
    model = build_gpt_model(model_args, config, padded, pre_process=layout.first_stage,
                            post_process=layout.last_stage, init_seed=seed)
    model.to(layout.device)
    if weights == load:
        load_checkpoint(load, TrainState(model, layout), weights_only=True)
    else:
        _load_with_adapters(model, layout, weights, load, run_config["peft"], seed)
    model.eval()
    return LoadedModel(model, model_args, tokenizer, run_config, layout, padded)


def _load_hf_backend(directory: str, tp: int, pp: int, seed: int,
                    vocab_file: Optional[str], bf16: bool):
    """The :class:`LoadedModel` of the checkpoint of the hf backend in ``directory``:
    transformers' model behind megatron-core's call (one process: its model is whole)."""
    from megatron_ext.checkpointing.hf_export import trained_model
    from megatron_ext.checkpointing.run_config import load_run_config
    from megatron_ext.inference.hf_model import HFCausalLM

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


def _load_with_adapters(model, layout: Layout, base: str, adapters: str, settings: dict,
                        seed: int) -> None:
    """The base weights, the adapters, then the adapters folded into the weights: the
    adapted function at the plain model's cost per token."""
    from megatron_ext.peft.adapters import add_adapters, merge_into_base
    from megatron_ext.peft.config import PeftArgs

    add_adapters(model, PeftArgs.from_settings(settings), tuple(settings["targets"]), seed)
    load_checkpoint(base, TrainState(model, layout, parts="base"), weights_only=True)
    load_checkpoint(adapters, TrainState(model, layout, parts="adapters"), weights_only=True)
    merge_into_base(model)


def full_logits(loaded: LoadedModel, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Real-vocabulary logits ``[b, s, vocab]`` of whole sequences (no padding).

    Returns the logits on last-pipeline-stage ranks and None on the others;
    with PP > 1 the forward pass runs through megatron-core's pipeline
    schedule.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = loaded.layout.device
    tokens = tokens.to(device)
    batch, length = tokens.shape
    position_ids = torch.arange(length, device=device).expand(batch, length)
    mask = attention_mask(torch.ones_like(tokens, dtype=torch.int32), loaded.window)
    vocab = loaded.tokenizer.vocab_size

    def finish(output: torch.Tensor) -> torch.Tensor:
        # [b, s, padded vocab / TP] per rank -> the whole real vocabulary
        logits = gather_from_tensor_model_parallel_region(output)
        return logits[..., :vocab].float()

    with torch.no_grad():
        if loaded.layout.pp == 1:
            return finish(loaded.model(tokens, position_ids, mask))

        def forward_step(data_iterator, model):
            output = model(next(data_iterator), position_ids, mask)
            return output, lambda out, non_loss_data=True: finish(out)

        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[loaded.model],
            num_microbatches=1, seq_length=length, micro_batch_size=batch, forward_only=True,
            collect_non_loss_data=True)
    return collected[0] if loaded.layout.last_stage else None
