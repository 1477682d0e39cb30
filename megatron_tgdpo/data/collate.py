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

__all__ = ["PreferenceCollator", "SequenceCollator", "collate_rows", "padding_multiple"]


def padding_multiple(*, pad_to_multiple_of: int, tensor_parallel: int = 1, sequence_parallel: bool = False,
                     context_parallel: int = 1) -> int:
    """What every row length must be a multiple of for a layout: ``--pad-to-multiple-of``, times what
    the layout needs on top. Context parallelism cuts a row into ``2 * CP`` chunks; sequence
    parallelism splits each CP rank's share of the row over the TP ranks (megatron's embedding
    scatters the sequence dimension), so rows must divide by ``TP * CP``. Taking the lcm means the
    default 16 works at TP 3 with sequence parallelism (rows become multiples of 48) instead of
    failing inside megatron."""
    multiple = math.lcm(pad_to_multiple_of, 2 * context_parallel) if context_parallel > 1 else pad_to_multiple_of
    if sequence_parallel:
        multiple = math.lcm(multiple, tensor_parallel * context_parallel)
    return multiple


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
        prompts = [np.asarray(item["prompt"], dtype=np.int64) for item in items]
        responses = [np.asarray(item["chosen"], dtype=np.int64) for item in items] + [
            np.asarray(item["rejected"], dtype=np.int64) for item in items
        ]
        names = [f"pair {item.get('index', i)} ({side})" for side in ("chosen", "rejected")
                 for i, item in enumerate(items)]
        tensors = collate_rows(prompts + prompts, responses, pad_id=self.pad_id,
                               seq=self.sequence_length(max(len(p) + len(r) for p, r in zip(prompts + prompts, responses))),
                               names=names, fixed_length=self.fixed_length)
        tensors["sample_idx"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
        return tensors


def collate_rows(
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    *,
    pad_id: int,
    seq: int,
    names: Sequence[str],
    fixed_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """One row per (prompt, response): ``input_ids``, shifted ``labels``, response-only ``loss_mask``,
    ``position_ids``, padded to ``seq``. Shared by the pair and the single-sequence (SFT) collators."""
    row_lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    longest = max(row_lengths)
    if longest > seq:
        row = int(np.argmax(row_lengths))
        raise ValueError(
            f"{names[row]} is {longest} tokens long, more than fixed_length={fixed_length}; prepare the data with "
            f"--max-seq-length {fixed_length} (or smaller), or raise fixed_length"
        )
    rows = len(prompts)
    input_ids = np.full((rows, seq), pad_id, dtype=np.int64)
    labels = np.full((rows, seq), pad_id, dtype=np.int64)
    loss_mask = np.zeros((rows, seq), dtype=np.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n = len(prompt) + len(response)
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : n] = response
        labels[row, : n - 1] = input_ids[row, 1:n]
        # Position t predicts token t + 1: response tokens sit at len(prompt) .. n - 1. With an empty
        # prompt the first response token has no predecessor and cannot be a label.
        loss_mask[row, max(len(prompt) - 1, 0) : n - 1] = 1.0
    positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (rows, seq))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(np.ascontiguousarray(positions)),
    }


@dataclass(frozen=True, kw_only=True)
class SequenceCollator(PreferenceCollator):
    """Single sequences (prompt + response, e.g. SFT on the chosen responses): one row each, the same
    padding rules, labels and mask as :class:`PreferenceCollator`; ``sample_idx`` per row."""

    response_key: str = "chosen"

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty micro-batch")
        prompts = [np.asarray(item["prompt"], dtype=np.int64) for item in items]
        responses = [np.asarray(item[self.response_key], dtype=np.int64) for item in items]
        names = [f"sample {item.get('index', i)}" for i, item in enumerate(items)]
        seq = self.sequence_length(max(len(p) + len(r) for p, r in zip(prompts, responses)))
        tensors = collate_rows(prompts, responses, pad_id=self.pad_id, seq=seq, names=names,
                               fixed_length=self.fixed_length)
        tensors["sample_idx"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
        return tensors
