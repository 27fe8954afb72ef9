"""Child script: load a checkpoint at this run's TP/PP and save its logits for given tokens.

  torchrun --nproc_per_node N check_logits.py LOAD TOKENS.pt OUT.pt TP PP [VOCAB_FILE]
"""

import sys

import torch

from megatron_ext.inference.loading import full_logits, load_for_inference


def main() -> None:
    load, tokens_file, out, tp, pp = sys.argv[1:6]
    vocab_file = sys.argv[6] if len(sys.argv) > 6 else None
    loaded = load_for_inference(load, int(tp), int(pp), vocab_file=vocab_file)
    logits = full_logits(loaded, torch.load(tokens_file))
    if logits is not None and loaded.layout.tp_rank == 0 and loaded.layout.dp_rank == 0:
        torch.save(logits.cpu(), out)


if __name__ == "__main__":
    main()
