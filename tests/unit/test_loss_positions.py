"""A batch's trained positions (``Batch.loss_positions``): taken on the host where the batch is collated,
they are exactly ``loss_mask``'s nonzero positions, follow the batch to its device, are retaken when a
new mask replaces the old, are dropped for a context-parallel slice (the flat indices would name the
full row), and move with each member when frozen scoring joins micro-batches into one row. The LM head
computes log-probs at these positions only (``tests/distributed/test_fused_head.py`` checks the values
and gradients against every position computed)."""
from __future__ import annotations

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.data.collate import PreferenceCollator
from megatron_tgdpo.data.packing import PackedPreferenceCollator
from megatron_tgdpo.runtime.frozen import joined_batch

PAD = 0


def _items(seed: int, count: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 50, (n,), generator=g).tolist()

    return [{"index": 100 * seed + i, "prompt": ids(3 + i), "chosen": ids(4 + 2 * i), "rejected": ids(2 + i)}
            for i in range(count)]


def _mask_positions(batch: Batch) -> list[int]:
    return torch.nonzero(batch["loss_mask"].reshape(-1)).reshape(-1).tolist()


def test_collated_batches_carry_their_trained_positions():
    rows = Batch.from_rows(PreferenceCollator(pad_id=PAD, pad_to_multiple_of=1)(_items(1)), num_pairs=3)
    packed = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=1)(_items(2))
    shared = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=1, share_prompt=True)(_items(3))
    for batch in (rows, packed, shared):
        positions = batch.loss_positions
        assert positions is not None and positions.dtype == torch.int64
        assert positions.tolist() == _mask_positions(batch) and positions.numel() > 0
        assert batch.to(torch.device("cpu")).loss_positions.tolist() == positions.tolist()


def test_a_new_mask_retakes_them_and_a_context_parallel_slice_drops_them():
    batch = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=2)(_items(4))
    extra = torch.zeros_like(batch["loss_mask"])
    assert batch.with_per_token(ref_logps=extra).loss_positions.tolist() == _mask_positions(batch)
    fewer = batch["loss_mask"].clone()
    fewer[0, : fewer.shape[1] // 2] = 0
    narrowed = batch.with_per_token(loss_mask=fewer)
    assert narrowed.loss_positions.tolist() == _mask_positions(narrowed) != _mask_positions(batch)
    assert batch.for_context_parallel(cp_rank=1, cp_size=2).loss_positions is None
    assert batch.for_context_parallel(cp_rank=0, cp_size=1).loss_positions is batch.loss_positions


def test_joined_micro_batches_keep_each_members_positions():
    collate = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=1, share_prompt=True)
    members = [collate(_items(seed)) for seed in (5, 6, 7)]
    joined = joined_batch(members)
    full_mask = torch.cat([m["loss_mask"] for m in members], dim=1)
    assert joined.loss_positions.tolist() == torch.nonzero(full_mask.reshape(-1)).reshape(-1).tolist()
    # a member without known positions: the joined row computes every position
    unknown = [members[0], Batch.from_packed({k: v for k, v in members[1].tensors.items() if k != "loss_mask"},
                                             num_pairs=members[1].num_pairs, num_sequences=members[1].num_sequences,
                                             prefix_of=members[1].prefix_of)]
    assert unknown[1].loss_positions is None and joined_batch(unknown).loss_positions is None
