"""SFT loss: the masked token cross-entropy, against an independent float64 computation from logits."""
from __future__ import annotations

import pytest
import torch

from megatron_tgdpo.losses import sft_loss_sums
from megatron_tgdpo.ops import vocab_parallel_logprobs


def test_sft_loss_equals_float64_masked_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 37, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 37, (3, 11), generator=gen)
    mask = (torch.rand(3, 11, generator=gen) > 0.4).float()
    logits32 = logits.float().requires_grad_(True)
    nll, tokens, metrics = sft_loss_sums(vocab_parallel_logprobs(logits32, labels), mask)
    # Independent reference: float64 log-softmax, mean over the masked tokens only.
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), reduction="none")
    ref_sum = (ref * mask.reshape(-1).double()).sum()
    assert tokens.item() == mask.sum().item()
    assert abs(nll.item() - ref_sum.item()) < 1e-4 * max(1.0, abs(ref_sum.item()))
    total, count = metrics["loss"]
    assert abs(total.item() / count.item() - (ref_sum / mask.sum()).item()) < 1e-6
    (nll / tokens).backward()
    logits64 = logits.clone().requires_grad_(True)
    ref64 = torch.nn.functional.cross_entropy(logits64.reshape(-1, 37), labels.reshape(-1), reduction="none")
    ((ref64 * mask.reshape(-1).double()).sum() / mask.sum()).backward()
    assert torch.allclose(logits32.grad.double(), logits64.grad, atol=1e-7)


def test_masked_positions_never_reach_the_loss():
    logps = torch.tensor([[-1.0, float("nan"), -2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    nll, tokens, _ = sft_loss_sums(logps, mask)
    assert nll.item() == 3.0 and tokens.item() == 2.0
    nll.backward()
    assert logps.grad.tolist() == [[-1.0, 0.0, -1.0, 0.0]]


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="loss_mask has shape"):
        sft_loss_sums(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        sft_loss_sums(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3))
