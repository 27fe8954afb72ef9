"""Child process for tests/training/test_packing.py: the isolation proof of packing.

Documents packed into one row (segment ids, restarted positions) give every token the
loss it has when its document is the only one in its row: per document, the packed row's
token losses against the document's own row, for models whose attention could leak
(Llama; Mistral's sliding window, which must be ANDed with the documents' mask; GPT's
learned absolute positions, which must restart). Rank 0 writes, per model, the largest
difference and the losses' scale to ``OUT.json``.

(test_packing.py calls ``main([OUT.json])`` in the session's run_many.py workers.)
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

SEQ, VOCAB = 96, 256
MODELS = {"llama2": {}, "mistral": {"sliding_window_size": 16}, "gpt": {}}


def documents() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three documents (tokens, roles): user then assistant tokens, 41 + 30 + 22 = 93."""
    rng = np.random.default_rng(5)
    out = []
    for length in (41, 30, 22):
        roles = np.r_[np.ones(length // 3), np.full(length - length // 3, 2)].astype(np.uint8)
        out.append((rng.integers(3, VOCAB, length), roles))
    return out


def token_losses(model, batch, window, separate: bool = True) -> torch.Tensor:
    """Per-token losses as the trainer's step computes them (``separate=False``: the
    documents' mask replaced by a plain causal one, to show what a leak looks like)."""
    from megatron_ext.models.masks import attention_mask

    segments = batch.segment_ids if separate else (batch.segment_ids > 0).int()
    with torch.no_grad():
        return model(batch.tokens, batch.position_ids, attention_mask(segments, window),
                     labels=batch.labels).float()


def check(name: str, settings: dict) -> dict:
    from megatron_ext.data.collate import collate
    from megatron_ext.models.builder import build_gpt_model, transformer_config
    from megatron_ext.models.config import ModelArgs, PrecisionArgs
    from megatron_ext.parallel import ParallelArgs

    args = ModelArgs(model_name=name, num_layers=2, hidden_size=64, num_attention_heads=4,
                     num_attention_heads_kv=2, seq_length=SEQ, **settings)
    model = build_gpt_model(args, transformer_config(args, ParallelArgs(), PrecisionArgs()),
                            VOCAB, True, True).eval()
    docs = documents()
    packed = collate([docs], SEQ, 0, variable_seq_lengths=True)
    assert int(packed.segment_ids.max()) == len(docs)
    window = args.mask_window
    together = token_losses(model, packed, window)[0]
    mixed = token_losses(model, packed, window, separate=False)[0]
    differences, scale = [], 0.0
    for number, doc in enumerate(docs, start=1):
        alone = collate([[doc]], SEQ, 0, variable_seq_lengths=True)
        own = token_losses(model, alone, window)[0][alone.segment_ids[0] == 1]
        inside = together[packed.segment_ids[0] == number]
        differences.append((own - inside).abs().max().item())
        scale = max(scale, own.abs().max().item())
    last = packed.segment_ids[0] == len(docs)
    leak = (mixed[last] - together[last]).abs().max().item()
    return {"max_abs_diff": max(differences), "scale": scale, "leak": leak,
            "documents": len(docs), "packed_width": int(packed.tokens.shape[1])}


def main(argv=None) -> None:
    from megatron_ext.parallel import init_distributed

    path = (sys.argv[1:] if argv is None else argv)[0]
    layout = init_distributed(1, 1, 1234)
    report = {name: check(name, settings) for name, settings in MODELS.items()}
    if layout.rank == 0:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
