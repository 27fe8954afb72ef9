"""Context parallelism's pieces: the zigzag split, the batch shard, the mask (in process),
and ``PortableAttention`` at CP=2 against itself at CP=1 (outputs and q/k/v gradients, in
a 2-process run_many.py worker: the gathered keys and values need a real CP group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.data.collate import (
    Batch,
    collate,
    gathered_positions,
    pack_rows,
    zigzag_indices,
)
from megatron_ext.models.masks import attention_mask
from megatron_ext.parallel import ParallelArgs
from tests.runs import call_job, start_runs, started, starts_early


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_ranks_partition_the_row_in_two_chunks_each(cp):
    length = 8 * cp
    kept = [zigzag_indices(length, cp, rank) for rank in range(cp)]
    assert sorted(torch.cat(kept).tolist()) == list(range(length))
    chunk = length // (2 * cp)
    for rank, positions in enumerate(kept):
        first, second = positions[:chunk], positions[chunk:]
        assert first.tolist() == list(range(rank * chunk, (rank + 1) * chunk))
        assert second.tolist() == list(range((2 * cp - 1 - rank) * chunk,
                                             (2 * cp - rank) * chunk))
    assert torch.equal(gathered_positions(length, cp), torch.cat(kept))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_zigzag_balances_causal_work(cp):
    """Every rank's queries see the same number of keys under a causal mask."""
    length = 16 * cp
    work = [int((zigzag_indices(length, cp, rank) + 1).sum()) for rank in range(cp)]
    assert len(set(work)) == 1, work
    # a plain split into CP blocks would not be
    block = length // cp
    plain = [sum(range(rank * block + 1, (rank + 1) * block + 1)) for rank in range(cp)]
    assert len(set(plain)) == cp


def test_zigzag_refuses_rows_that_do_not_split():
    with pytest.raises(ValueError, match="does not split into 4 chunks"):
        zigzag_indices(18, 2, 0)
    with pytest.raises(ValueError, match="rank 2"):
        zigzag_indices(16, 2, 2)


def _packed_batch(width_multiple: int = 16) -> Batch:
    """Two rows: three samples packed into one, one alone, padded to the multiple."""
    rng = torch.Generator().manual_seed(0)
    samples = [(torch.randint(5, 90, (n,), generator=rng).numpy(),
                torch.randint(0, 3, (n,), generator=rng).numpy()) for n in (9, 14, 5, 20)]
    rows = pack_rows([len(t) - 1 for t, _ in samples], 32)
    return collate([[samples[i] for i in row] for row in rows], 32, 0, 0.25,
                   variable_seq_lengths=True, multiple=width_multiple)


@pytest.mark.parametrize("cp", [2, 4])
def test_shard_takes_the_same_positions_from_every_field(cp):
    batch = _packed_batch()
    assert int(batch.segment_ids.max()) >= 2  # packed: position ids restart per sample
    width = batch.tokens.shape[1]
    shards = [batch.context_parallel_shard(cp, rank) for rank in range(cp)]
    for field in ("tokens", "labels", "loss_weights", "position_ids", "segment_ids"):
        whole = getattr(batch, field)
        for rank, shard in enumerate(shards):
            part = getattr(shard, field)
            assert part.shape == (whole.shape[0], width // cp)
            assert torch.equal(part, whole[:, zigzag_indices(width, cp, rank)])
    # the loss weights and real tokens split without loss
    assert sum(s.total_weight for s in shards) == pytest.approx(batch.total_weight)
    assert sum(s.real_tokens for s in shards) == batch.real_tokens
    assert batch.context_parallel_shard(1, 0) is batch


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cp", [2, 4])
def test_mask_is_the_serial_rows_with_keys_in_gathered_order(cp, window):
    segments = _packed_batch().segment_ids
    width = segments.shape[1]
    serial = attention_mask(segments, window)
    keys = gathered_positions(width, cp)
    for rank in range(cp):
        mask = attention_mask(segments, window, cp, rank)
        assert mask.shape == (segments.shape[0], 1, width // cp, width)
        rows = zigzag_indices(width, cp, rank)
        assert torch.equal(mask, serial[:, :, rows][:, :, :, keys])


def test_mask_keeps_packed_samples_apart_under_cp():
    """Row 0 holds samples 1 (positions 0-7) and 2 (8-15): at CP=2 rank 0 holds queries
    0-3 and 12-15; query 12 (sample 2) sees keys 8..12 only, whichever rank holds them."""
    segments = torch.tensor([[1] * 8 + [2] * 8])
    mask = attention_mask(segments, None, 2, 0)[0, 0]
    keys = gathered_positions(16, 2).tolist()
    seen = sorted(keys[k] for k in range(16) if not mask[4, k])  # row 4 = query 12
    assert seen == [8, 9, 10, 11, 12]


@pytest.mark.parametrize("tp, cp, sp, multiple", [
    (1, 1, False, 1), (2, 1, True, 2), (1, 2, False, 4), (1, 3, False, 6),
    (2, 2, False, 4), (2, 2, True, 4), (4, 2, True, 8), (3, 2, True, 12)])
def test_sequence_multiple(tp, cp, sp, multiple):
    args = ParallelArgs(tensor_model_parallel_size=tp, context_parallel_size=cp,
                        sequence_parallel=sp)
    assert args.sequence_multiple == multiple
    if sp:  # each CP rank's share splits over the TP ranks
        assert (multiple // cp) % tp == 0


# ---------------------------------------------------------------- the attention at CP=2
CASES = ["causal_mask_none", "packed", "packed_gqa", "padded_gqa_one_group", "window_packed",
         "window_mask_none"]
TOL = 1e-5  # fp32, O(1) inputs; the gathered keys sum in another order


def _cp_child(out_path: str) -> None:
    """In each of 2 processes: PortableAttention at CP=2 on this rank's positions against
    the same module at CP=1 on the whole row; max abs differences over both ranks."""
    import copy

    import torch.distributed as dist
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models.attention import PortableAttention
    from megatron_ext.parallel import init_distributed

    layout = init_distributed(1, 1, 1234, cp=2)
    assert layout.cp == 2 and layout.dp == 1
    cp, rank, s, b, hn = 2, layout.cp_rank, 16, 2, 8
    packed = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3, [1] * 3 + [2] * 9 + [3] * 4])
    padded = torch.tensor([[1] * 13 + [0] * 3, [1] * 16])

    def config(ng, window=None):
        return TransformerConfig(num_layers=2, hidden_size=4 * hn, num_attention_heads=4,
                                 num_query_groups=ng, attention_dropout=0.0,
                                 masked_softmax_fusion=False, context_parallel_size=cp,
                                 window_size=window)

    def run(module, q, k, v, mask, proj):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = module(*leaves, mask)
        (out * proj).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    def case(ng, segments=None, window=None):
        cfg = config(ng, window)
        serial_cfg = copy.copy(cfg)
        serial_cfg.context_parallel_size = 1
        gen = torch.Generator().manual_seed(7)  # the same whole row on both ranks
        q = torch.randn(s, b, 4, hn, generator=gen)
        k, v = (torch.randn(s, b, ng, hn, generator=gen) for _ in range(2))
        proj = torch.randn(s, b, 4 * hn, generator=gen)
        window_tokens = None if window is None else window[0] + 1
        whole = None if segments is None else attention_mask(segments, window_tokens)
        mine = None if segments is None else attention_mask(segments, window_tokens, cp, rank)
        want = run(PortableAttention(serial_cfg, 1, AttnMaskType.causal, "self"),
                   q, k, v, whole, proj)
        keep = zigzag_indices(s, cp, rank)
        got = run(PortableAttention(cfg, 1, AttnMaskType.causal, "self"),
                  *(t[keep] for t in (q, k, v)), mine, proj[keep])
        diffs = torch.tensor([(g - w[keep]).abs().max().item() for g, w in zip(got, want)],
                             dtype=torch.float64)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        return {"out": float(diffs[0]), "grad": float(diffs[1:].max()),
                "scale": float(want[0].abs().max())}

    res = {"causal_mask_none": case(4), "packed": case(4, packed),
           "packed_gqa": case(2, packed), "padded_gqa_one_group": case(1, padded),
           "window_packed": case(2, packed, (3, 0)), "window_mask_none": case(2, None, (3, 0))}
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))


@starts_early("cp_attention")
def start_cp_attention(request):
    root = request.getfixturevalue("tmp_path_factory").mktemp("cp_attention")
    out = root / "results.json"
    launch = start_runs(2, [call_job("cp_attention", "tests.models.test_context_parallel:_cp_child",
                                     str(out))], root / "launch", early=True)
    return launch, out


@pytest.fixture(scope="module")
def cp_attention(request) -> dict:
    launch, out = started("cp_attention", request)
    result = launch.wait()["cp_attention"]
    assert result.returncode == 0, result.log[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_attention_at_cp2_equals_the_serial_attention(cp_attention, case):
    result = cp_attention[case]
    assert result["scale"] > 0.1
    assert result["out"] < TOL and result["grad"] < TOL, result
