"""Pack a micro-batch of B pairs into 2B padded rows for one forward pass of policy or reference.

Rows ``0..B-1`` are prompt + chosen response of the pairs in order, rows ``B..2B-1`` prompt + rejected
response in the same order. ``labels[:, t] = input_ids[:, t + 1]`` (the next token); the last position
and padding get ``pad_id``. ``loss_mask[:, t] = 1`` exactly where ``labels[:, t]`` is a response token
(the final end-of-response token included), so summing ``loss_mask * logp(labels)`` per row gives the
response log-likelihood that DPO needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["PreferenceCollator"]


@dataclass(frozen=True, kw_only=True)
class PreferenceCollator:
    """``S`` = longest row rounded up to a multiple of ``lcm(pad_to_multiple_of, 2 * context_parallel_size)``
    (context parallelism cuts the sequence into ``2 * CP`` chunks for load balance), or exactly
    ``fixed_length`` when given (pipeline parallelism needs one shape for every micro-batch)."""

    pad_id: int
    pad_to_multiple_of: int = 16
    context_parallel_size: int = 1
    fixed_length: int | None = None

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.context_parallel_size < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {self.context_parallel_size}")
        if self.fixed_length is not None:
            cp_chunks = 2 * self.context_parallel_size
            if self.fixed_length < 2 or self.fixed_length % cp_chunks:
                raise ValueError(
                    f"fixed_length={self.fixed_length} must be >= 2 and a multiple of 2 * context_parallel_size "
                    f"= {cp_chunks}"
                )

    @property
    def multiple(self) -> int:
        return math.lcm(self.pad_to_multiple_of, 2 * self.context_parallel_size)

    def sequence_length(self, longest_row: int) -> int:
        if self.fixed_length is not None:
            return self.fixed_length
        return max(1, -(-longest_row // self.multiple)) * self.multiple

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty micro-batch")
        batch = len(items)
        prompts = [np.asarray(item["prompt"], dtype=np.int64) for item in items]
        responses = [np.asarray(item["chosen"], dtype=np.int64) for item in items] + [
            np.asarray(item["rejected"], dtype=np.int64) for item in items
        ]
        prompts = prompts + prompts
        row_lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        longest = max(row_lengths)
        seq = self.sequence_length(longest)
        if longest > seq:
            row = int(np.argmax(row_lengths))
            side = "chosen" if row < batch else "rejected"
            raise ValueError(
                f"pair {items[row % batch].get('index', row % batch)} ({side}) is {longest} tokens long, more than "
                f"fixed_length={self.fixed_length}; prepare the data with --max-seq-length {self.fixed_length} "
                "(or smaller), or raise fixed_length"
            )
        input_ids = np.full((2 * batch, seq), self.pad_id, dtype=np.int64)
        labels = np.full((2 * batch, seq), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros((2 * batch, seq), dtype=np.float32)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            n = len(prompt) + len(response)
            input_ids[row, : len(prompt)] = prompt
            input_ids[row, len(prompt) : n] = response
            labels[row, : n - 1] = input_ids[row, 1:n]
            # Position t predicts token t + 1: response tokens sit at len(prompt) .. n - 1. With an empty
            # prompt the first response token has no predecessor and cannot be a label.
            loss_mask[row, max(len(prompt) - 1, 0) : n - 1] = 1.0
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (2 * batch, seq))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(np.ascontiguousarray(positions)),
            "sample_idx": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        }
