"""Supervised fine-tuning: token cross-entropy on the response tokens, in summable form.

``loss = -sum(loss_mask * logp) / sum(loss_mask)`` over the whole global batch (a per-token mean, as
megatron-core's ``calculate_per_token_loss``). Each context-parallel rank holds its own tokens, so its
numerator and count are its own: summing over ranks gives the global values with no extra collective.
"""
from __future__ import annotations

import torch

from megatron_tgdpo.losses.preference import MetricSums

__all__ = ["sft_loss_sums"]


def sft_loss_sums(logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
    """(summed negative log-likelihood of the masked tokens, their count, metric sums).

    ``logps``: fp32/fp64 token log-probs (any shape); ``loss_mask``: same shape, nonzero on trained
    tokens. Masked positions never reach the loss or the gradient, whatever they hold (inf, nan)."""
    if logps.shape != loss_mask.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, expected {tuple(logps.shape)}")
    if logps.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"logps must be float32 or float64, got {logps.dtype}")
    keep = loss_mask != 0
    nll = -torch.where(keep, logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).sum()
    tokens = keep.sum().to(torch.float32)
    metrics: MetricSums = {"loss": (nll.detach().to(torch.float32), tokens)}
    return nll, tokens, metrics
