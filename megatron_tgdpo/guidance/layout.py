"""Where the responses of one micro-batch are, as the token-weight plug-ins need it.

A weight function sees this context-parallel rank's tokens (``local``), like the loss. The functions
that look at a whole response at once (per-response normalisation, the within-response shuffle) work on
the full micro-batch instead: :meth:`ResponseLayout.full` all-gathers a local per-token tensor over the
context-parallel group and :meth:`ResponseLayout.local` takes this rank's positions back, so their
result does not depend on the layout. Without context parallelism both are the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_tgdpo.data.batch import Batch

__all__ = ["ResponseLayout"]


@dataclass(frozen=True)
class ResponseLayout:
    """One micro-batch's responses: per-token maps on this rank's slice and on the full batch."""

    #: True on this rank's response tokens (those the loss trains)
    response: torch.Tensor
    #: +1.0 on chosen, -1.0 on rejected sequences; broadcastable to the local per-token shape
    sign: torch.Tensor
    #: the full micro-batch (every position); what :meth:`full` returns tensors shaped like
    batch: Batch
    #: this rank's slice of ``batch`` (``batch`` itself without context parallelism)
    sliced: Batch
    cp_group: Optional[Any] = None

    @classmethod
    def of(cls, batch: Batch, *, sliced: Optional[Batch] = None, cp_group: Optional[Any] = None,
           dtype: torch.dtype = torch.float32) -> "ResponseLayout":
        """The layout of ``batch`` (full), with ``sliced`` its context-parallel slice held here."""
        sliced = batch if sliced is None else sliced
        mask = sliced["loss_mask"]
        response = mask if mask.dtype == torch.bool else mask != 0
        if sliced.packed:
            sign = torch.where(sliced["sequence_ids"] < sliced.num_pairs, 1.0, -1.0).to(dtype)
        else:
            rows = response.shape[0]
            sign = torch.ones(rows, 1, dtype=dtype, device=response.device)
            sign[rows // 2:] = -1.0
        return cls(response=response, sign=sign, batch=batch, sliced=sliced, cp_group=cp_group)

    # ---- context parallelism ----------------------------------------------------------------------
    def full(self, local: torch.Tensor) -> torch.Tensor:
        """A per-token tensor of this rank's slice, made whole over the context-parallel group."""
        if self.sliced.cp_slice is None:
            return local
        return self.sliced.gather_context_parallel(local, group=self.cp_group)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a per-token tensor of the full micro-batch."""
        if self.sliced.cp_slice is None:
            return full
        cp_rank, cp_size, _ = self.sliced.cp_slice
        return full[:, self.batch.cp_positions(cp_rank=cp_rank, cp_size=cp_size)]

    # ---- the full batch's sequences -----------------------------------------------------------------
    def full_response(self) -> torch.Tensor:
        mask = self.batch["loss_mask"]
        return mask if mask.dtype == torch.bool else mask != 0

    def full_sequence_ids(self) -> torch.Tensor:
        """``[R, S]`` int64: each position's sequence index (rows layout: its row; -1 where none)."""
        if self.batch.packed:
            return self.batch["sequence_ids"].long()
        rows, seq = self.batch.shape
        return torch.arange(rows, device=self.batch["input_ids"].device).unsqueeze(1).expand(rows, seq)

    def sequence_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N] dataset index, [N] side)`` of each sequence: side 0 chosen, 1 rejected."""
        pairs = self.batch.num_pairs
        samples = self.batch["sample_idx"].long()
        if samples.numel() == pairs:
            samples = torch.cat([samples, samples])
        side = torch.zeros(2 * pairs, dtype=torch.long, device=samples.device)
        side[pairs:] = 1
        return samples, side
