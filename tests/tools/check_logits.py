"""Child script: load a checkpoint at this run's TP/PP and save its logits for given tokens.

  torchrun --nproc_per_node N check_logits.py LOAD TOKENS.pt OUT.pt TP PP [VOCAB_FILE]
  torchrun --nproc_per_node N check_logits.py --many TP PP LOAD TOKENS.pt OUT.pt [LOAD ...]
"""

import sys

import torch

from megatron_ext.inference.loading import full_logits, load_for_inference


def main() -> None:
    if sys.argv[1] == "--many":  # --many TP PP (LOAD TOKENS.pt OUT.pt)...: one launch, many
        tp, pp, rest = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
        jobs = [rest[i:i + 3] for i in range(0, len(rest), 3)]
        vocab_file = None
    else:
        load, tokens_file, out, tp, pp = sys.argv[1:6]
        tp, pp, jobs = int(tp), int(pp), [(load, tokens_file, out)]
        vocab_file = sys.argv[6] if len(sys.argv) > 6 else None
    for load, tokens_file, out in jobs:
        loaded = load_for_inference(load, tp, pp, vocab_file=vocab_file)
        logits = full_logits(loaded, torch.load(tokens_file))
        if logits is not None and loaded.layout.tp_rank == 0 and loaded.layout.dp_rank == 0:
            torch.save(logits.cpu(), out)


if __name__ == "__main__":
    main()
