"""Packing preference pairs: the first-fit-decreasing planner (determinism, capacity, pairs never
split, padding only to 2*CP multiples, statistics) and the packed collator, sequence by sequence
against the unpacked PreferenceCollator on the same items (labels never cross a boundary)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.data.collate import PreferenceCollator
from megatron_tgdpo.data.packing import (
    PackedPreferenceCollator,
    capacity_for,
    packed_seq_params_for,
    padded_length,
    plan_packing,
)

PAD = 0
EOS = 2


def _item(rng: np.random.Generator, index: int, prompt: int, chosen: int, rejected: int) -> dict:
    draw = lambda n, end: np.append(rng.integers(3, 200, n - end), [EOS] * end).astype(np.int32)  # noqa: E731
    return {"prompt": draw(prompt, 0), "chosen": draw(chosen, 1), "rejected": draw(rejected, 1), "index": index}


def _items(seed: int = 0, count: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = [(int(rng.integers(0, 9)), int(rng.integers(1, 12)), int(rng.integers(1, 12))) for _ in range(count)]
    lengths[0] = (0, 3, 1)  # an empty prompt: the first response token has no predecessor
    return [_item(rng, 100 + i, *lens) for i, lens in enumerate(lengths)]


def _lengths(items) -> list[tuple[int, int, int]]:
    return [(len(i["prompt"]), len(i["chosen"]), len(i["rejected"])) for i in items]


# --------------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------------


def test_capacity_and_padded_length():
    assert capacity_for(micro_batch_size=4, seq_length=512) == 4096
    assert [padded_length(n, context_parallel_size=1) for n in (0, 1, 2, 3, 4)] == [2, 2, 2, 4, 4]
    assert [padded_length(n, context_parallel_size=2) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert [padded_length(n, context_parallel_size=3) for n in (6, 7, 12, 13)] == [6, 12, 12, 18]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_plan_is_deterministic_within_capacity_and_covers_every_pair_once(cp):
    rng = np.random.default_rng(cp)
    lengths = rng.integers(1, 60, size=(40, 3))
    capacity = 2 * 2 * 64  # mbs 2, seq length 64
    plan = plan_packing(lengths, capacity=capacity, context_parallel_size=cp)
    assert plan == plan_packing(lengths.tolist(), capacity=capacity, context_parallel_size=cp)
    assert sorted(i for b in plan.bins for i in b) == list(range(len(lengths)))
    for b in plan.bins:
        assert list(b) == sorted(b)  # stream order inside a bin
        # A pair is its two padded sequences: chosen and rejected are counted (and placed) together.
        size = sum(padded_length(int(lengths[i, 0] + lengths[i, side]), context_parallel_size=cp)
                   for i in b for side in (1, 2))
        assert size <= capacity


def test_first_fit_decreasing_with_stable_ties():
    # CP=1, empty prompts: pair sizes are the responses rounded up to even lengths.
    lengths = [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 2, 2), (0, 2, 2)]  # sizes 4, 4, 8, 4, 4
    plan = plan_packing(lengths, capacity=12)
    # Largest first (pair 2: 8 tokens), then the 4-token pairs in stream order 0, 1, 3, 4:
    # pair 0 joins pair 2 (12 full), pairs 1, 3, 4 open and fill the second bin.
    assert plan.bins == ((0, 2), (1, 3, 4))
    # Where FFD beats first fit in stream order (4+6+4 | 8 | 10: three bins): 6+10 | 4+8+4.
    lengths = [(0, 1, 1), (0, 3, 1), (0, 3, 3), (0, 5, 3), (0, 1, 1)]  # sizes 4, 6, 8, 10, 4
    assert plan_packing(lengths, capacity=16).bins == ((1, 3), (0, 2, 4))


def test_plan_names_a_pair_that_cannot_fit_alone():
    lengths = [(2, 3, 3), (10, 30, 2), (1, 1, 1)]
    with pytest.raises(ValueError, match=r"pair 77 \(stream position 1\) needs 52 tokens"):
        plan_packing(lengths, capacity=48, context_parallel_size=2, sample_ids=[5, 77, 9])
    with pytest.raises(ValueError, match="pair at stream position 1"):
        plan_packing(lengths, capacity=48, context_parallel_size=2)


def test_plan_statistics():
    lengths = [(4, 3, 2), (2, 6, 3), (10, 10, 10)]  # CP=2: sizes 8+8, 8+8, 20+20
    real = 4 + 3 + 4 + 2 + 2 + 6 + 2 + 3 + 20 + 20
    plan = plan_packing(lengths, capacity=48, context_parallel_size=2)
    assert plan.bins == ((2,), (0, 1))
    assert (plan.real_tokens, plan.padded_tokens, plan.computed_tokens) == (real, 72, 72)
    # Fixed-length rows (pipeline parallelism) compute the whole capacity per bin.
    fixed = plan_packing(lengths, capacity=48, context_parallel_size=2, fixed_length=48)
    assert fixed.computed_tokens == 96 and fixed.num_bins == 2
    assert fixed.efficiency == pytest.approx(real / 96)
    # Without a fixed length the rows round up to lcm(pad_to_multiple_of, 2 * CP).
    rounded = plan_packing(lengths, capacity=48, context_parallel_size=2, pad_to_multiple_of=16)
    assert rounded.computed_tokens == 48 + 32
    # The padded path at the same flags (mbs 1, seq length 24) computes 3 x 48 = 144 tokens.
    assert fixed.computed_tokens < 3 * capacity_for(micro_batch_size=1, seq_length=24)


# --------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp,fixed_length", [(1, None), (1, 300), (2, None), (2, 300), (3, 312)])
def test_each_sequence_matches_the_unpacked_row(cp, fixed_length):
    items = _items()
    batch = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=cp, fixed_length=fixed_length)(items)
    rows = PreferenceCollator(pad_id=PAD, pad_to_multiple_of=1)(items)
    assert isinstance(batch, Batch) and batch.packed
    assert (batch.num_pairs, batch.num_sequences) == (len(items), 2 * len(items))
    assert batch["sample_idx"].tolist() == [i["index"] for i in items]
    bounds = batch.segment_bounds()
    assert batch["cu_seqlens"].dtype == torch.int32 and bounds[0] == 0
    assert bounds[-1] == batch.shape[1] == (fixed_length or bounds[-1])
    for n in range(batch.num_sequences):
        start, end = bounds[n], bounds[n + 1]
        length = int((rows["input_ids"][n] != PAD).sum())  # item tokens are never the pad id
        # Each sequence is padded to the next multiple of 2 x CP, no more.
        assert end - start == padded_length(length, context_parallel_size=cp)
        for key in ("input_ids", "labels", "loss_mask", "position_ids"):
            got, want = batch[key][0, start:end], rows[key][n, : end - start]
            assert torch.equal(got[:length], want[:length]), (key, n)
        assert (batch["input_ids"][0, start + length : end] == PAD).all()
        assert (batch["labels"][0, start + length - 1 : end] == PAD).all()  # last token: nothing to predict
        assert (batch["loss_mask"][0, start + length - 1 : end] == 0).all()
        assert torch.equal(batch["position_ids"][0, start:end], torch.arange(end - start))
        assert (batch["sequence_ids"][0, start:end] == n).all()
    # The tail (if any) is one segment of padding, its own positions, sequence id -1.
    tail = slice(bounds[batch.num_sequences], batch.shape[1])
    assert (batch["sequence_ids"][0, tail] == -1).all() and (batch["loss_mask"][0, tail] == 0).all()
    assert len(bounds) == batch.num_sequences + 1 + (tail.start < tail.stop)
    # Per-sequence sums through the contract equal the unpacked rows'.
    assert torch.equal(batch.sequence_sums(batch["loss_mask"]), rows["loss_mask"].sum(-1))


def test_labels_never_cross_a_sequence_boundary():
    batch = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2)(_items(seed=3))
    ids, labels, seq = batch["input_ids"][0], batch["labels"][0], batch["sequence_ids"][0]
    for t in range(batch.shape[1] - 1):
        if labels[t] != PAD:
            # A real label is the next position's token, and that position is the same sequence.
            assert labels[t] == ids[t + 1] and seq[t] == seq[t + 1] >= 0
    # In particular the token before each boundary predicts nothing (not the next sequence's first token).
    for boundary in batch.segment_bounds()[1:-1]:
        assert labels[boundary - 1] == PAD


def test_row_length_without_fixed_length_and_errors():
    items = _items(count=3)
    plain = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2)(items)
    rounded = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, pad_to_multiple_of=64)(items)
    content = plain.segment_bounds()[-1]
    assert plain.shape[1] == content and len(plain.segment_bounds()) == 7  # no tail needed
    assert rounded.shape[1] == -(-content // 64) * 64 > content
    assert rounded.segment_bounds()[:-1] == plain.segment_bounds()
    with pytest.raises(ValueError, match="multiple of 2"):
        PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, fixed_length=30)
    with pytest.raises(ValueError, match=r"pairs \[100, 101, 102\] need"):
        PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, fixed_length=8)(items)
    with pytest.raises(ValueError, match="empty"):
        PackedPreferenceCollator(pad_id=PAD)([])


def test_plan_then_collate_every_bin():
    items = _items(seed=1, count=12)
    row = capacity_for(micro_batch_size=2, seq_length=24)
    collate = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, fixed_length=row)
    plan = collate.plan(_lengths(items), capacity=row, sample_ids=[i["index"] for i in items])
    batches = [collate([items[i] for i in b]) for b in plan.bins]
    assert all(b.shape == (1, row) for b in batches)
    assert sorted(int(x) for b in batches for x in b["sample_idx"]) == [i["index"] for i in items]
    assert plan.computed_tokens == sum(b.num_tokens for b in batches)
    assert plan.padded_tokens == sum(int((b["sequence_ids"] >= 0).sum()) for b in batches)
    assert plan.real_tokens == sum(len(i["prompt"]) * 2 + len(i["chosen"]) + len(i["rejected"]) for i in items)
    assert plan.real_tokens == sum(b.real_tokens for b in batches)


def test_context_parallel_slices_keep_whole_chunks_of_each_sequence():
    batch = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, fixed_length=300)(_items())
    bounds = batch.segment_bounds()
    parts = [batch.for_context_parallel(cp_rank=r, cp_size=2) for r in range(2)]
    for rank, part in enumerate(parts):
        cols = batch.cp_positions(cp_rank=rank, cp_size=2)
        assert torch.equal(part["position_ids"][0], batch["position_ids"][0, cols])
        assert torch.equal(part["cu_seqlens"], batch["cu_seqlens"])  # full-row boundaries on every rank
    # Every segment is split in 4 chunks; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    start, end = bounds[1], bounds[2]
    quarter = (end - start) // 4
    expected0 = list(range(start, start + quarter)) + list(range(end - quarter, end))
    cols0 = batch.cp_positions(cp_rank=0, cp_size=2).tolist()
    assert expected0 == [c for c in cols0 if start <= c < end]


def test_packed_seq_params_for():
    batch = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2, fixed_length=300)(_items())
    params = packed_seq_params_for(batch)
    bounds = batch.segment_bounds()
    assert params.qkv_format == "thd"
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert getattr(params, field) is batch["cu_seqlens"]
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    assert params.max_seqlen_q == params.max_seqlen_kv == longest and isinstance(longest, int)
    assert longest < bounds[-1]  # never the row length (megatron would stop restarting RoPE positions)
    rows = Batch.from_rows(PreferenceCollator(pad_id=PAD)(_items()), num_pairs=7)
    assert packed_seq_params_for(rows) is None
