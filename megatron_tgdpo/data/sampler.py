"""Deterministic, resumable data-parallel sampling of pair indices.

The **global stream** is an infinite concatenation of per-epoch orders: position ``g`` is sample
``perm_e[g % N]`` with ``e = g // N``, where ``perm_e`` is a permutation of ``range(N)`` determined by
``(seed, e)`` alone (the identity when ``shuffle=False``). Each step takes the next
``micro_batch_size * data_parallel_size`` positions; DP rank ``r`` gets the slice
``[r * mbs, (r + 1) * mbs)`` of them. ``consumed_samples`` counts positions already taken by all ranks
together, so a sampler built with ``consumed_samples=c`` continues the stream at position ``c``:
resuming gives exactly the order an uninterrupted run would have produced from there on. Steps that
cross an epoch boundary simply take the tail of one epoch and the head of the next.

The permutation is computed with a splitmix64 hash and a stable argsort, not with numpy's random
generators, so the order does not change across numpy versions (numpy promises no stream stability).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["PreferenceSampler", "epoch_permutation", "splitmix64"]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised; uint64 arithmetic wraps modulo 2**64 as intended."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """int64 permutation of ``range(num_samples)`` for ``(seed, epoch)``."""
    key = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    scores = splitmix64(np.arange(num_samples, dtype=np.uint64) ^ key)
    return np.argsort(scores, kind="stable").astype(np.int64)


class PreferenceSampler:
    """Iterator of micro-batches (lists of dataset indices) for one data-parallel rank; infinite.

    ``consumed_samples`` (a read-only property) advances by ``micro_batch_size * data_parallel_size``
    with every micro-batch yielded, so it can be saved in a checkpoint and passed back on resume.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        consumed_samples: int = 0,
        seed: int = 1234,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"need 0 <= data_parallel_rank < data_parallel_size, got rank {data_parallel_rank} of {data_parallel_size}"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.shuffle = shuffle
        self._consumed = consumed_samples
        self._cached_epoch = -1
        self._cached_perm = np.empty(0, dtype=np.int64)

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @property
    def global_step_samples(self) -> int:
        """Positions of the global stream taken per micro-batch step, across all DP ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def epoch_of(self, consumed_samples: int) -> int:
        """The epoch that the next sample after ``consumed_samples`` belongs to."""
        return consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_perm = (
                epoch_permutation(self.num_samples, seed=self.seed, epoch=epoch)
                if self.shuffle
                else np.arange(self.num_samples, dtype=np.int64)
            )
            self._cached_epoch = epoch
        return self._cached_perm

    def global_indices(self, start: int, count: int) -> list[int]:
        """Samples at global stream positions ``[start, start + count)``."""
        out: list[int] = []
        position = start
        end = start + count
        while position < end:
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
            position += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        start = self._consumed + self.data_parallel_rank * self.micro_batch_size
        batch = self.global_indices(start, self.micro_batch_size)
        self._consumed += self.global_step_samples
        return batch
