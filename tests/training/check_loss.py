"""Run by test_loss.py in a child process: the trainer's loss against a hand computation.

Usage: python check_loss.py PREFIX VOCAB_FILE SCALAR_LOSS_MASK
Prints one JSON line: the trainer's first-iteration loss and the reference
(test_loss.py calls ``main([PREFIX, VOCAB_FILE, SCALAR_LOSS_MASK])`` in a run_many.py
worker).
"""

import json
import sys

import torch
import torch.nn.functional as F

from megatron_ext.training.arguments import build_parser, config_from_args
from megatron_ext.models.masks import attention_mask
from megatron_ext.training.trainer import Trainer


def main(argv=None) -> None:
    prefix, vocab, scalar = sys.argv[1:4] if argv is None else argv
    args = build_parser().parse_args([
        "--data_path", prefix, "--split", "100,0,0", "--tokenizer_type", "SentencePieceTokenizer",
        "--vocab_file", vocab, "--vocab_extra_ids_list", "<|im_start|>,<|im_end|>",
        "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4",
        "--seq_length", "96", "--variable_seq_lengths", "--micro_batch_size", "2",
        "--global_batch_size", "6", "--train_iters", "1", "--lr", "1e-3",
        "--scalar_loss_mask", scalar])
    trainer = Trainer(config_from_args(args))
    gb = trainer.batches.global_batch(trainer.splits["train"], 0, 6)
    weights = torch.tensor([0.0, 1.0, 1.0])
    weights[:2] = float(scalar)
    numerator = denominator = 0.0
    model = trainer.model.module
    with torch.no_grad():
        for mb in gb.micro_batches:
            logits = model(mb.tokens, mb.position_ids, attention_mask(mb.segment_ids))
            ce = F.cross_entropy(logits.float().flatten(0, 1), mb.labels.flatten(),
                                 reduction="none").view(mb.labels.shape)
            numerator += float((ce * mb.loss_weights).sum())
            denominator += float(mb.loss_weights.sum())
    step = trainer.train_step()
    print(json.dumps({"trainer": step["loss"], "reference": numerator / denominator,
                      "denominator": denominator, "total_weight": gb.total_weight,
                      "micro_batches": len(gb.micro_batches),
                      "widths": [int(mb.tokens.shape[1]) for mb in gb.micro_batches]}))


if __name__ == "__main__":
    main()
