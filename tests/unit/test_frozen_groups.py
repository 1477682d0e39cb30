"""Which micro-batches a frozen model scores per call (``runtime.frozen.call_groups``) and the packed row
that call reads (``joined_batch``)."""
from __future__ import annotations

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.runtime.frozen import AUTO_TOKENS_PER_CALL, call_groups, joined_batch


def _packed(lengths: list[int], *, start: int = 0, prefix_of=None) -> Batch:
    row = sum(lengths)
    bounds = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    ids = torch.arange(start, start + row).reshape(1, row)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).reshape(1, row)
    tensors = {"input_ids": ids, "labels": ids + 1000, "loss_mask": torch.ones(1, row), "position_ids": position_ids,
               "cu_seqlens": bounds, "sequence_ids": torch.zeros(1, row, dtype=torch.long)}
    return Batch.from_packed(tensors, num_pairs=len(lengths) // 2, num_sequences=len(lengths), real_tokens=row,
                             prefix_of=prefix_of)


def _groups(batches, **overrides):
    settings = dict(per_call=0, cuda=False, pipeline_shapes_vary=False, pipeline_parallel=1, context_parallel=1)
    return call_groups(batches, **{**settings, **overrides})


def test_automatic_groups_fill_the_token_budget_in_order():
    quarter = AUTO_TOKENS_PER_CALL // 4
    batches = [_packed([quarter // 2, quarter // 2]) for _ in range(9)]
    assert _groups(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    # a micro-batch longer than the budget is a call of its own
    long = [_packed([AUTO_TOKENS_PER_CALL, 2]), _packed([2, 2]), _packed([2, 2])]
    assert _groups(long) == [[0], [1, 2]]


def test_an_explicit_count_and_where_calls_stay_single():
    batches = [_packed([3, 5]) for _ in range(5)]
    single = [[i] for i in range(5)]
    assert _groups(batches, per_call=2) == [[0, 1], [2, 3], [4]]
    assert _groups(batches, per_call=1) == single
    assert _groups(batches, cuda=True) == single  # automatic: one call per micro-batch on a GPU
    assert _groups(batches, cuda=True, per_call=3) == [[0, 1, 2], [3, 4]]  # unless asked
    assert _groups(batches, context_parallel=2) == single
    assert _groups(batches, pipeline_parallel=2) == single  # fixed message shapes
    assert _groups(batches, pipeline_parallel=2, per_call=5) == single  # fixed message shapes
    assert _groups(batches, pipeline_parallel=2, pipeline_shapes_vary=True) == single  # automatic: PP 1 only
    assert _groups(batches, pipeline_parallel=2, pipeline_shapes_vary=True, per_call=5) == [list(range(5))]
    shared = [_packed([3, 5], prefix_of=(-1, 0)) for _ in range(5)]  # shared-prompt rows group too
    assert _groups(shared) == [list(range(5))]
    assert _groups(shared, context_parallel=2) == single
    rows = [Batch.from_rows({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, num_pairs=1) for _ in range(3)]
    assert _groups(rows) == [[0], [1], [2]]


def test_joined_batch_puts_rows_side_by_side_with_every_segment_its_own():
    a, b = _packed([3, 5, 2]), _packed([4, 4], start=100)
    joined = joined_batch([a, b])
    assert joined.packed and joined.shape == (1, 18)
    assert joined.segment_bounds() == [0, 3, 8, 10, 14, 18]
    assert joined["cu_seqlens"].tolist() == [0, 3, 8, 10, 14, 18]
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(joined[key], torch.cat([a[key], b[key]], dim=1))
    assert joined.num_sequences == 5 and joined.num_pairs == 2
    assert joined_batch([a]) is a
    assert joined.prefix_of is None  # no shared prompts: none in the joined row either


def test_joined_batch_renumbers_each_rows_prompt_segments():
    a = _packed([3, 5, 4], prefix_of=(-1, 0, 0))  # a prompt and its two responses
    b = _packed([2, 2], start=100)  # a row without shared prompts
    c = _packed([2, 3, 3, 1], start=200, prefix_of=(-1, 0, 0, -1))
    joined = joined_batch([a, b, c])
    assert joined.segment_bounds() == [0, 3, 8, 12, 14, 16, 18, 21, 24, 25]
    assert joined.prefix_of == (-1, 0, 0, -1, -1, -1, 5, 5, -1)
