"""PreferenceSampler: exact epoch coverage across DP ranks, resumption at any consumed-samples count,
determinism, and argument checks."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_tgdpo.data.sampler import PreferenceSampler, epoch_permutation


def _ranks(num_samples: int, *, mbs: int, dp: int, consumed: int = 0, seed: int = 1234, shuffle: bool = True):
    return [
        PreferenceSampler(
            num_samples,
            micro_batch_size=mbs,
            data_parallel_rank=r,
            data_parallel_size=dp,
            consumed_samples=consumed,
            seed=seed,
            shuffle=shuffle,
        )
        for r in range(dp)
    ]


def _global_stream(samplers, steps: int) -> list[int]:
    """Interleave ranks step by step: the order the global stream hands samples out."""
    out: list[int] = []
    for _ in range(steps):
        for sampler in samplers:
            out.extend(next(sampler))
    return out


@pytest.mark.parametrize("num_samples,mbs,dp", [(24, 2, 3), (37, 3, 4), (5, 4, 2), (1, 1, 1)])
def test_each_epoch_is_a_permutation_split_over_ranks(num_samples, mbs, dp):
    step = mbs * dp
    steps = -(-3 * num_samples // step) + 1
    stream = _global_stream(_ranks(num_samples, mbs=mbs, dp=dp), steps)
    for epoch in range(3):
        chunk = stream[epoch * num_samples : (epoch + 1) * num_samples]
        assert sorted(chunk) == list(range(num_samples)), f"epoch {epoch} is not a permutation"


def test_whole_epochs_split_exactly_once_over_ranks():
    num_samples, mbs, dp = 48, 4, 3
    samplers = _ranks(num_samples, mbs=mbs, dp=dp)
    steps_per_epoch = num_samples // (mbs * dp)
    for _ in range(2):
        seen = [i for s in samplers for _ in range(steps_per_epoch) for i in next(s)]
        assert sorted(seen) == list(range(num_samples))
    per_rank = [set(next(s)) for s in samplers]
    assert all(not (a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1 :])


def test_rank_slices_of_each_step():
    samplers = _ranks(100, mbs=3, dp=4, seed=7)
    stream = samplers[0].global_indices(0, 12)
    assert [next(s) for s in samplers] == [stream[0:3], stream[3:6], stream[6:9], stream[9:12]]


@pytest.mark.parametrize("num_samples,mbs,dp", [(37, 3, 4), (10, 2, 1), (16, 4, 2)])
def test_resuming_anywhere_continues_the_same_order(num_samples, mbs, dp):
    step = mbs * dp
    total_steps = -(-4 * num_samples // step)
    reference = _global_stream(_ranks(num_samples, mbs=mbs, dp=dp), total_steps)
    for consumed in range(0, total_steps * step - step + 1, step):
        resumed = _ranks(num_samples, mbs=mbs, dp=dp, consumed=consumed)
        remaining = _global_stream(resumed, total_steps - consumed // step)
        assert remaining == reference[consumed:], f"resume at {consumed}"
        assert resumed[0].consumed_samples == total_steps * step


def test_resuming_at_a_non_multiple_continues_the_global_stream():
    reference = _ranks(23, mbs=2, dp=2)[0].global_indices(0, 200)
    resumed = _ranks(23, mbs=2, dp=2, consumed=13)
    assert _global_stream(resumed, 10) == reference[13:53]


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_permutation(1000, seed=1, epoch=0)
    assert np.array_equal(a, epoch_permutation(1000, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_permutation(1000, seed=2, epoch=0))
    assert not np.array_equal(a, epoch_permutation(1000, seed=1, epoch=1))
    # Pinned values: the order must never change across numpy versions or refactors, or resumed runs
    # would silently see different data.
    assert epoch_permutation(10, seed=1234, epoch=0).tolist() == PINNED_PERMUTATION


PINNED_PERMUTATION = [2, 3, 5, 6, 4, 0, 9, 1, 7, 8]


def test_no_shuffle_is_sequential():
    (sampler,) = _ranks(5, mbs=2, dp=1, shuffle=False)
    assert [next(sampler) for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]


def test_epoch_of():
    (sampler,) = _ranks(10, mbs=2, dp=1)
    assert [sampler.epoch_of(c) for c in (0, 9, 10, 25)] == [0, 0, 1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_samples=0),
        dict(micro_batch_size=0),
        dict(data_parallel_rank=2, data_parallel_size=2),
        dict(consumed_samples=-1),
    ],
)
def test_bad_arguments(kwargs):
    settings = dict(num_samples=10, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2)
    settings.update(kwargs)
    num_samples = settings.pop("num_samples")
    with pytest.raises(ValueError):
        PreferenceSampler(num_samples, **settings)
