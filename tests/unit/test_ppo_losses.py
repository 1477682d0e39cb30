"""megatron_tgdpo.losses.ppo against independent float64 re-derivations: GAE and returns, whitening, the
token rewards (RTO's dense DPO reward, the sparse score at the last token, the KL penalty), and the
clipped policy and value losses in value and gradient, with prompt and padding positions masked out."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tgdpo.losses.ppo import (explained_variance, explained_variance_sums, gae, last_token_mask,
                                       masked_whiten, policy_loss_sums, token_rewards, value_loss_sums)

# rows: (prompt length, response length) inside S = 12 positions; the response span of a row with
# prompt p and response r is positions p-1 .. p+r-2 (position t predicts token t+1)
SPANS = [(3, 5), (1, 11), (5, 1), (2, 7)]
S = 12


def _mask() -> torch.Tensor:
    mask = torch.zeros(len(SPANS), S)
    for row, (p, r) in enumerate(SPANS):
        mask[row, p - 1:p - 1 + r] = 1.0
    return mask


def _spans():
    return [(p - 1, p - 1 + r) for p, r in SPANS]


def _poisoned(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Garbage (inf, nan, huge) where the mask is 0: must never reach a result or a gradient."""
    junk = torch.tensor([float("inf"), float("nan"), -1e30, float("-inf")], dtype=values.dtype)
    filler = junk[torch.arange(values.numel()) % 4].reshape(values.shape)
    return torch.where(mask != 0, values, filler)


def _reference_gae(rewards, values, gamma, lam):
    """Textbook GAE over one episode, python floats (float64)."""
    T = len(rewards)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_and_returns_equal_a_float64_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    mask = _mask()
    rewards = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    adv, ret = gae(_poisoned(rewards, mask), _poisoned(values, mask), mask, gamma=gamma, lam=lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    for row, (a, b) in enumerate(_spans()):
        want_adv, want_ret = _reference_gae(rewards[row, a:b].tolist(), values[row, a:b].tolist(), gamma, lam)
        assert adv[row, a:b].tolist() == pytest.approx(want_adv, rel=1e-12, abs=1e-12)
        assert ret[row, a:b].tolist() == pytest.approx(want_ret, rel=1e-12, abs=1e-12)
        outside = torch.ones(S, dtype=torch.bool)
        outside[a:b] = False
        assert (adv[row, outside] == 0).all() and (ret[row, outside] == 0).all()


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    mask = _mask()
    rewards = torch.rand(mask.shape, dtype=torch.float64) * mask
    values = torch.rand(mask.shape, dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    assert torch.allclose(ret, to_go, atol=1e-12)
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-12)


def test_whitening_is_over_masked_entries_and_can_be_global():
    gen = torch.Generator().manual_seed(1)
    mask = _mask()
    x = torch.randn(mask.shape, generator=gen, dtype=torch.float64) * 3 + 2
    white = masked_whiten(_poisoned(x, mask), mask)
    kept = x[mask != 0]
    want = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=False) + 1e-8)
    assert torch.allclose(white[mask != 0], want, atol=1e-12)
    assert (white[mask == 0] == 0).all()
    # "global" statistics over two halves (two ranks) equal those of the whole
    top, bottom = slice(0, 2), slice(2, 4)
    stats = {}

    def reduce_with(other_x, other_mask):
        def reduce(local):
            keep = other_mask != 0
            o = torch.where(keep, other_x, torch.zeros((), dtype=other_x.dtype))
            return local + torch.stack([keep.sum().double(), o.sum(), (o * o).sum()])
        return reduce

    stats["top"] = masked_whiten(x[top], mask[top], reduce=reduce_with(x[bottom], mask[bottom]))
    stats["bottom"] = masked_whiten(x[bottom], mask[bottom], reduce=reduce_with(x[top], mask[top]))
    assert torch.allclose(torch.cat([stats["top"], stats["bottom"]]), white, atol=1e-12)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(unshifted[mask != 0], want + kept.mean(), atol=1e-12)


def test_last_token_mask():
    mask = _mask()
    last = last_token_mask(mask)
    for row, (a, b) in enumerate(_spans()):
        want = torch.zeros(S)
        want[b - 1] = 1
        assert torch.equal(last[row], want)
    assert last_token_mask(torch.zeros(2, 5)).sum() == 0


def test_token_rewards_dense_sparse_and_kl():
    gen = torch.Generator().manual_seed(2)
    mask = _mask()
    policy, ref, dpo = (-torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    scores = torch.tensor([0.25, 1.0, 0.0, 0.5], dtype=torch.float64)
    beta, dense_scale, sparse_scale, kl_coef = 0.1, 2.0, 3.0, 0.05
    rewards, parts = token_rewards(mask, policy_logps=_poisoned(policy, mask), ref_logps=_poisoned(ref, mask),
                                   dpo_logps=_poisoned(dpo, mask), kl_coef=kl_coef, beta=beta, dense_scale=dense_scale,
                                   scores=scores, sparse_scale=sparse_scale)
    for row, (a, b) in enumerate(_spans()):
        for t in range(S):
            if a <= t < b:
                dense = dense_scale * beta * (dpo[row, t].item() - ref[row, t].item())
                kl = policy[row, t].item() - ref[row, t].item()
                sparse = sparse_scale * scores[row].item() if t == b - 1 else 0.0
                assert rewards[row, t].item() == pytest.approx(dense + sparse - kl_coef * kl, abs=1e-12)
                assert parts["dense"][row, t].item() == pytest.approx(dense, abs=1e-12)
                assert parts["kl"][row, t].item() == pytest.approx(kl, abs=1e-12)
                assert parts["sparse"][row, t].item() == pytest.approx(sparse, abs=1e-12)
            else:
                assert rewards[row, t].item() == 0.0
    only_sparse, parts = token_rewards(mask, policy_logps=ref, ref_logps=ref, kl_coef=kl_coef, scores=scores)
    assert (parts["dense"] == 0).all() and torch.allclose(only_sparse.sum(1), scores)


def _reference_policy_loss(logps, old, adv, mask, eps):
    """Per-token float64 loop; returns (numerator, count, clipped count)."""
    total, count, clipped = 0.0, 0, 0
    for row, (a, b) in enumerate(_spans()):
        for t in range(a, b):
            ratio = math.exp(logps[row, t].item() - old[row, t].item())
            a_t = adv[row, t].item()
            u, c = -a_t * ratio, -a_t * min(max(ratio, 1 - eps), 1 + eps)
            total += max(u, c)
            clipped += c > u
            count += 1
    return total, count, clipped


def test_policy_loss_value_gradient_and_masking():
    gen = torch.Generator().manual_seed(3)
    mask = _mask()
    old = -torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 2
    logps = (old + torch.randn(mask.shape, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    eps = 0.2
    loss, count, metrics = policy_loss_sums(logps, _poisoned(old, mask), _poisoned(adv, mask), mask, clip_range=eps)
    want, want_count, want_clipped = _reference_policy_loss(logps.detach(), old, adv, mask, eps)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert count.item() == want_count == mask.sum().item()
    assert metrics["ppo/clip_fraction"][0].item() == want_clipped > 0  # the test exercises clipping
    loss.backward()
    # gradient: -A * ratio where the unclipped term is the max (or they are equal), 0 where clipping binds
    ratio = torch.exp(logps.detach() - old)
    clipped = -adv * ratio.clamp(1 - eps, 1 + eps)
    binds = clipped > -adv * ratio
    want_grad = torch.where((mask != 0) & ~binds, -adv * ratio, torch.zeros_like(adv))
    assert torch.allclose(logps.grad, want_grad, atol=1e-12)
    assert (logps.grad[mask == 0] == 0).all()
    # the gradient also equals autograd through an independent formula on the kept entries only
    keep = mask != 0
    lp = logps.detach()[keep].clone().requires_grad_()
    r = torch.exp(lp - old[keep])
    independent = torch.maximum(-adv[keep] * r, -adv[keep] * r.clamp(1 - eps, 1 + eps)).sum()
    independent.backward()
    assert torch.allclose(logps.grad[keep], lp.grad, atol=1e-12)
    assert independent.item() == pytest.approx(loss.item(), rel=1e-12)


def test_policy_loss_at_old_policy_is_minus_mean_advantage_and_no_clipping():
    mask = _mask()
    old = -torch.rand(mask.shape, dtype=torch.float64)
    adv = torch.randn(mask.shape, dtype=torch.float64)
    loss, count, metrics = policy_loss_sums(old.clone(), old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item(), rel=1e-12)
    assert metrics["ppo/clip_fraction"][0].item() == 0
    assert metrics["ppo/approx_kl"][0].item() == 0
    assert metrics["ppo/ratio"][0].item() == count.item()


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_value_gradient_and_masking(clip):
    gen = torch.Generator().manual_seed(4)
    mask = _mask()
    old = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    values = (old + torch.randn(mask.shape, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    returns = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    loss, count, metrics = value_loss_sums(values, _poisoned(old, mask), _poisoned(returns, mask), mask,
                                           clip_range=clip)
    want, clipped_count = 0.0, 0
    keep = mask != 0
    for row, (a, b) in enumerate(_spans()):
        for t in range(a, b):
            v, o, r = values[row, t].item(), old[row, t].item(), returns[row, t].item()
            u = (v - r) ** 2
            if clip is None:
                want += 0.5 * u
            else:
                c = (o + min(max(v - o, -clip), clip) - r) ** 2
                want += 0.5 * max(u, c)
                clipped_count += abs(v - o) > clip and c > u
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert count.item() == keep.sum().item()
    assert metrics["ppo/value_clip_fraction"][0].item() == clipped_count
    if clip is not None:
        assert clipped_count > 0
    loss.backward()
    v = values.detach()[keep].clone().requires_grad_()
    if clip is None:
        independent = 0.5 * ((v - returns[keep]) ** 2).sum()
    else:
        vc = old[keep] + (v - old[keep]).clamp(-clip, clip)
        independent = 0.5 * torch.maximum((v - returns[keep]) ** 2, (vc - returns[keep]) ** 2).sum()
    independent.backward()
    assert torch.allclose(values.grad[keep], v.grad, atol=1e-12)
    assert (values.grad[~keep] == 0).all()


def test_explained_variance():
    mask = _mask()
    returns = torch.randn(mask.shape, dtype=torch.float64)
    assert explained_variance(explained_variance_sums(returns, returns, mask)) == pytest.approx(1.0)
    zero = torch.zeros_like(returns)
    ev = explained_variance(explained_variance_sums(zero, returns, mask))
    kept = returns[mask != 0]
    assert ev == pytest.approx(1 - kept.var(unbiased=False).item() / kept.var(unbiased=False).item())
    noisy = returns + torch.randn(mask.shape, dtype=torch.float64) * 0.3
    r, v = returns[mask != 0], noisy[mask != 0]
    want = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert explained_variance(explained_variance_sums(noisy, returns, mask)) == pytest.approx(want.item(), rel=1e-9)


def test_shape_errors_name_the_tensor():
    mask = _mask()
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros_like(mask), torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="scores"):
        token_rewards(mask, policy_logps=mask, ref_logps=mask, kl_coef=0.0, scores=torch.zeros(3))
