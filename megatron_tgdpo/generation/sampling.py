"""Next-token choice from full-vocabulary logits, with randomness keyed by *what* is sampled.

Every draw uses one uniform number derived by hashing ``(seed, prompt key, sample index, step)``
(splitmix64, counter-based), not a stateful generator. So a sequence's tokens do not depend on which
other sequences share its batch, on the batch order, on the data-parallel split, or on the TP/PP
layout: every rank that samples computes the same number for the same sequence and step. The token is
then the inverse CDF of the (temperature-scaled, top-k/top-p cut) distribution at that number, so one
uniform per row and step is all the randomness needed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_tgdpo.data.sampler import splitmix64  # the project's one splitmix64 (seeded data order)
from megatron_tgdpo.generation.config import SamplingConfig

_U64 = 0xFFFFFFFFFFFFFFFF


def keyed_uniforms(*, seed: int, prompt_keys: Sequence[int], sample_indices: Sequence[int],
                   steps: Sequence[int]) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per row, from ``(seed, prompt key, sample index, step)``."""
    def u64(values) -> np.ndarray:
        return np.asarray([int(v) & _U64 for v in values], dtype=np.uint64)

    x = splitmix64(np.full(len(prompt_keys), int(seed) & _U64, dtype=np.uint64))
    for part in (u64(prompt_keys), u64(sample_indices), u64(steps)):
        x = splitmix64(x ^ part)
    # The top 53 bits, as a double in [0, 1).
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of ``tokens`` [b] under ``logits`` [b, V] (temperature 1, full vocabulary)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, sampling: SamplingConfig,
                  *, vocab_limit: Optional[int] = None) -> torch.Tensor:
    """Token ids [b] from full-vocabulary ``logits`` [b, V].

    ``vocab_limit``: ids at or above it are never chosen (a vocabulary padded past the tokenizer's
    size has rows that decode to nothing). Ties are broken towards the lower id (stable sort), so the
    choice is a pure function of the logits and the uniform.
    """
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    if 0 < sampling.top_k < probs.shape[-1]:
        probs[:, sampling.top_k:] = 0.0
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if sampling.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < sampling.top_p, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put the target at the very end: fall back to the last token with mass.
    last_kept = (probs > 0).sum(dim=-1) - 1
    pick = torch.minimum(pick, last_kept)
    return order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
