"""PPO on per-token tensors: token rewards (RTO's dense DPO reward, a sparse sequence score, the KL
penalty), GAE, advantage whitening, and the clipped policy and value losses in summable form.

Everything here is a pure function of ``[R, S]`` tensors laid out like the trainer's micro-batches:
position ``t`` of a row holds what belongs to the token *predicted* at ``t`` (``labels[:, t]``), and
``mask`` is 1 on the response tokens, which form one contiguous span per row (prompt positions and
padding are 0). Values at masked-out positions never reach a result or a gradient, whatever they hold
(inf, nan). No megatron import: the trainer (``algorithms/ppo``) supplies cross-rank sums where a
statistic is global (``reduce``).

Conventions (RTO, "DPO Meets PPO", Zhong et al. 2024; PPO as in Ouyang et al. 2022):

* reward of token ``t``: ``dense_scale * beta * (log pi_dpo - log pi_ref)`` (the DPO model's implicit
  token reward), clipped to ``[-dense_clip, dense_clip]`` per token when ``dense_clip`` is set (RTO's
  official code clips it so that no token's dense reward outweighs the sequence score),
  ``- kl_coef * (log pi_old - log pi_ref)`` (the per-token KL penalty, k1 estimator), and
  ``sparse_scale * score`` added at the last response token;
* GAE: ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 after the last response token,
  ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t``;
* policy loss per token: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``;
* value loss per token: ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)``
  (``eps_v`` None: no clipping).

Losses return ``(numerator, count, metric sums)``: the trainer's schedule divides the summed numerators
by the summed counts of the whole global mini-batch. ``averaging="token"``: numerator = the per-token
losses summed, count = tokens (a mean over every token of the mini-batch: long responses weigh more);
``"sequence"``: numerator = each response's mean per-token loss, summed, count = responses (a mean of
per-response means, as OpenRLHF-based trainers, RTO's official code among them, average).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "AVERAGING",
    "MetricSums",
    "averaged",
    "explained_variance",
    "explained_variance_sums",
    "gae",
    "last_token_mask",
    "masked_whiten",
    "policy_loss_sums",
    "token_rewards",
    "value_loss_sums",
]

MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]
#: sums a tensor over the ranks that share a statistic (identity on one rank)
Reduce = Callable[[torch.Tensor], torch.Tensor]
#: how a loss averages its per-token terms over a mini-batch (see the module docstring)
AVERAGING = ("token", "sequence")


def _check(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [R, S], got shape {tuple(mask.shape)}")
    for name, value in tensors.items():
        if value is not None and value.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(mask.shape)} (the mask's)")


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """1.0 at the last nonzero position of each row of ``mask`` (all zeros for an empty row)."""
    keep = (mask != 0).to(torch.int64)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    last = torch.where(keep.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = 1.0
    return out.to(mask.dtype) if mask.dtype.is_floating_point else out


def token_rewards(
    mask: torch.Tensor,
    *,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_coef: float,
    dpo_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    dense_scale: float = 1.0,
    dense_clip: Optional[float] = None,
    scores: Optional[torch.Tensor] = None,
    sparse_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token rewards ``[R, S]`` (zero off the mask) and their parts, each ``[R, S]``:
    ``dense`` (``dense_scale * beta * (dpo - ref)``, then clamped to ``[-dense_clip, dense_clip]`` unless
    ``dense_clip`` is None or 0; zeros without ``dpo_logps``), ``sparse``
    (``sparse_scale * scores[r]`` at each row's last response token; zeros without ``scores``) and
    ``kl`` (``policy - ref``, before ``kl_coef``)."""
    _check(mask, policy_logps=policy_logps, ref_logps=ref_logps, dpo_logps=dpo_logps)
    keep = mask != 0
    kl = _masked(policy_logps - ref_logps, keep)
    dense = (_masked(dpo_logps - ref_logps, keep) * (dense_scale * beta) if dpo_logps is not None
             else torch.zeros_like(kl))
    if dense_clip:
        dense = dense.clamp(-dense_clip, dense_clip)
    if scores is not None:
        if scores.shape != (mask.shape[0],):
            raise ValueError(f"scores must be [R] = [{mask.shape[0]}], got {tuple(scores.shape)}")
        sparse = last_token_mask(keep).to(kl.dtype) * (sparse_scale * scores.to(kl.dtype)).unsqueeze(1)
    else:
        sparse = torch.zeros_like(kl)
    rewards = dense + sparse - kl_coef * kl
    return rewards, {"dense": dense, "sparse": sparse, "kl": kl}


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both ``[R, S]`` and zero off the mask, by generalised advantage
    estimation over each row's response span (the value after the last response token is 0: the
    episode ends there). Computed in the inputs' dtype; nothing flows back (call under no_grad or
    on detached tensors)."""
    _check(mask, rewards=rewards, values=values)
    keep = mask != 0
    rewards, values = _masked(rewards, keep), _masked(values, keep)
    kept = keep.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    seq = rewards.shape[1]
    for t in reversed(range(seq)):
        if t + 1 < seq:
            following = kept[:, t + 1]
            next_value = values[:, t + 1]  # already 0 off the mask
        else:
            following = torch.zeros_like(running)
            next_value = torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * following * running) * kept[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * kept
    return advantages, returns


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
    reduce: Optional[Reduce] = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (the mean added back when not
    ``shift_mean``); zero off the mask. ``reduce`` sums the statistics over ranks, so the mean and
    variance are those of the whole rollout. The variance is the population variance (1/n)."""
    _check(mask, values=values)
    keep = mask != 0
    x = _masked(values, keep).to(torch.float64)
    stats = torch.stack([keep.sum().to(torch.float64), x.sum(), (x * x).sum()])
    if reduce is not None:
        stats = reduce(stats)
    count, total, total_sq = stats[0], stats[1], stats[2]
    if count.item() == 0:
        return torch.zeros_like(values)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return _masked(white, keep).to(values.dtype)


def averaged(per_token: torch.Tensor, keep: torch.Tensor, *, averaging: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, count) of the masked ``per_token`` terms under ``averaging`` (module docstring);
    ``per_token`` must already be zero off ``keep``."""
    if averaging == "token":
        return per_token.sum(), keep.sum().to(torch.float32)
    if averaging != "sequence":
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    tokens = keep.sum(dim=1)
    has = tokens > 0
    per_row = per_token.sum(dim=1) / tokens.clamp_min(1).to(per_token.dtype)
    return torch.where(has, per_row, torch.zeros_like(per_row)).sum(), has.sum().to(torch.float32)


def policy_loss_sums(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_range: float, averaging: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
    """(the clipped surrogate loss's numerator and count under ``averaging``, metric sums).

    Metrics (per-token means once divided by their counts): ``ppo/policy_loss``,
    ``ppo/clip_fraction`` (tokens whose clipped term is the larger one, i.e. whose gradient is cut),
    ``ppo/approx_kl`` (``(ratio - 1) - log ratio``, the k3 estimator of KL(old || new)),
    ``ppo/ratio``."""
    _check(mask, logps=logps, old_logps=old_logps, advantages=advantages)
    keep = mask != 0
    log_ratio = _masked(logps - old_logps.to(logps.dtype), keep)
    ratio = torch.exp(log_ratio)
    adv = _masked(advantages.to(logps.dtype), keep)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss, count = averaged(_masked(per_token, keep), keep, averaging=averaging)
    tokens = keep.sum().to(torch.float32)
    with torch.no_grad():
        kept = keep.to(torch.float32)
        metrics: MetricSums = {
            "ppo/policy_loss": (loss.detach().float(), count),
            "ppo/clip_fraction": (((clipped > unclipped).float() * kept).sum(), tokens),
            "ppo/approx_kl": ((((ratio - 1.0) - log_ratio).float() * kept).sum(), tokens),
            "ppo/ratio": ((ratio.float() * kept).sum(), tokens),
        }
    return loss, count, metrics


def value_loss_sums(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
    clip_range: Optional[float], averaging: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
    """(the clipped value loss's numerator and count under ``averaging``, metric sums ``ppo/value_loss``,
    ``ppo/value_clip_fraction``). ``clip_range`` None: the plain squared error."""
    _check(mask, values=values, old_values=old_values, returns=returns)
    keep = mask != 0
    v = _masked(values, keep)
    old = _masked(old_values.to(values.dtype), keep)
    ret = _masked(returns.to(values.dtype), keep)
    unclipped = (v - ret) ** 2
    if clip_range is None:
        per_token = unclipped
        clipped_more = torch.zeros_like(keep)
    else:
        # Inside the clip range the clipped value *is* v (not old + (v - old), which can differ from v in
        # the last bit and make the clip count a coin toss between layouts).
        moved = v - old
        active = moved.abs() > clip_range
        v_clipped = torch.where(active, old + torch.clamp(moved, -clip_range, clip_range), v)
        clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_more = active & (clipped > unclipped)
    loss, count = averaged(0.5 * _masked(per_token, keep), keep, averaging=averaging)
    tokens = keep.sum().to(torch.float32)
    with torch.no_grad():
        metrics: MetricSums = {
            "ppo/value_loss": (loss.detach().float(), count),
            "ppo/value_clip_fraction": ((clipped_more & keep).float().sum(), tokens),
        }
    return loss, count, metrics


def explained_variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 ``[n, sum R, sum R^2, sum (R - V), sum (R - V)^2]`` over the masked tokens: summed over
    ranks, :func:`explained_variance` of the result is ``1 - Var(R - V) / Var(R)`` of the whole rollout."""
    _check(mask, values=values, returns=returns)
    keep = mask != 0
    r = _masked(returns, keep).to(torch.float64)
    d = r - _masked(values, keep).to(torch.float64)
    return torch.stack([keep.sum().to(torch.float64), r.sum(), (r * r).sum(), d.sum(), (d * d).sum()])


def explained_variance(sums: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` from :func:`explained_variance_sums` (nan when ``Var(R)`` is 0)."""
    n, r, r2, d, d2 = (float(x) for x in sums.tolist())
    if n <= 0:
        return float("nan")
    var_r = r2 / n - (r / n) ** 2
    var_d = d2 / n - (d / n) ** 2
    return 1.0 - var_d / var_r if var_r > 0 else float("nan")
