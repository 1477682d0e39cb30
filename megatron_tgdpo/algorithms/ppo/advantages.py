"""Token rewards, GAE and whitening of a scored rollout, and the rollout's metrics (last pipeline stage).

Whitening and the explained variance are over the *whole* rollout: their sums are all-reduced over the
data-parallel group, so the advantages a rank trains on do not depend on the data-parallel size.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.algorithms.ppo.rollout import Rollout, sampler_logps_tensor
from megatron_tgdpo.losses.ppo import explained_variance, explained_variance_sums, gae, masked_whiten, token_rewards
from megatron_tgdpo.runtime.metrics import StepMetrics

__all__ = ["ROLLOUT_MAXIMA", "ROLLOUT_MEANS", "compute_advantages", "dp_sum", "learned_sparse_reward"]

ROLLOUT_MEANS = ("reward/total", "reward/dense", "reward/sparse", "reward/kl_penalty", "reward/learned", "kl", "score",
                 "entropy",
                 "response_length", "rollout/eos_fraction", "values/mean", "returns/mean",
                 "ppo/explained_variance")
ROLLOUT_MAXIMA = ("rollout/logprob_gap",)


def dp_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over this rank's data-parallel group (in place; returned)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor


def learned_sparse_reward(raw: torch.Tensor, *, ppo: PPOConfig) -> torch.Tensor:
    """The reward model's scores as the sparse reward: ``(r - mean) / std`` (``--learned-reward-mean``,
    ``--learned-reward-std``: the reward model's own score statistics), clipped to
    ``[-c, c]`` (``--learned-reward-clip``; 0: no clip), as RTO's official code treats its reward model."""
    normalised = (raw.double() - ppo.learned_reward_mean) / ppo.learned_reward_std
    clip = ppo.learned_reward_clip
    return normalised.clamp(-clip, clip) if clip else normalised


def compute_advantages(rollout: Rollout, *, ppo: PPOConfig, beta: float, scores: Optional[torch.Tensor],
                       metrics: StepMetrics, learned: Optional[torch.Tensor] = None) -> None:
    """Add ``rewards``, ``advantages`` and ``returns`` to ``rollout.tensors`` and record the rollout's
    metrics. Last pipeline stage only (where the log-probs and values are). ``scores``: the sequence
    scores (float64 ``[N]``) when a scorer exists, used as the sparse reward when ``--reward`` has it;
    ``learned``: the reward model's raw scores (``--learned-reward-load``), which replace them, normalised
    and clipped (:func:`learned_sparse_reward`)."""
    t = rollout.tensors
    mask = rollout.mask
    sparse = learned_sparse_reward(learned, ppo=ppo) if learned is not None else scores
    rewards, parts = token_rewards(
        mask, policy_logps=t["old_logps"], ref_logps=t["ref_logps"], kl_coef=ppo.kl_coef,
        dpo_logps=t["dpo_logps"] if ppo.dense else None, beta=beta, dense_scale=ppo.dense_reward_scale,
        dense_clip=ppo.dense_reward_clip, scores=sparse.float() if ppo.sparse else None,
        sparse_scale=ppo.sparse_reward_scale,
    )
    advantages, returns = gae(rewards.double(), t["values"].double(), mask, gamma=ppo.gamma, lam=ppo.lam)
    ev = explained_variance(dp_sum(explained_variance_sums(t["values"], returns, mask)))
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask, reduce=dp_sum)
    t["rewards"], t["advantages"], t["returns"] = rewards.float(), advantages.float(), returns.float()

    device = mask.device
    n = torch.tensor(float(len(rollout)), device=device)
    tokens = mask.sum().float()
    keep = mask != 0
    one = torch.ones((), device=device)
    sums = {
        "reward/total": (rewards.sum(), n),
        "reward/dense": (parts["dense"].sum(), n),
        "reward/sparse": (parts["sparse"].sum(), n),
        "reward/kl_penalty": (ppo.kl_coef * parts["kl"].sum(), n),
        "kl": (parts["kl"].sum(), n),
        "entropy": (-(t["old_logps"] * mask).sum(), tokens),  # -E[log pi(y_t)]: a per-token entropy estimate
        "response_length": (torch.tensor(float(sum(len(r) for r in rollout.responses)), device=device), n),
        "rollout/eos_fraction": (torch.tensor(float(sum(f == "eos" for f in rollout.finish)), device=device), n),
        "values/mean": ((t["values"] * mask).sum(), tokens),
        "returns/mean": (returns.sum().float(), tokens),
        "ppo/explained_variance": (torch.tensor(ev, device=device), one),
    }
    if scores is not None:
        sums["score"] = (scores.sum().float(), n)
    if learned is not None:
        sums["reward/learned"] = (learned.sum().float(), n)
    metrics.add(sums)
    gap = (sampler_logps_tensor(rollout) - t["old_logps"]).abs()
    metrics.add_max("rollout/logprob_gap", torch.where(keep, gap, torch.zeros_like(gap)).max())
