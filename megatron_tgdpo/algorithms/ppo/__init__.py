"""PPO on megatron-core with RTO's dense DPO token rewards (``python -m megatron_tgdpo.ppo``).

Files: ``config`` (flags), ``prompts`` (the resumable prompt stream), ``rollout`` (sampling, rows,
token scores), ``rewards`` (sequence scores), ``advantages`` (token rewards, GAE, whitening, rollout
metrics), ``critic`` (critic build and schedule), ``step`` (the clipped-loss epochs), ``algorithm`` (the
runtime algorithm). The pure maths is :mod:`megatron_tgdpo.losses.ppo`; the value head is
:mod:`megatron_tgdpo.models.value_head`. See ``docs/rto.md``.
"""
from megatron_tgdpo.algorithms.ppo.config import REWARDS, PPOConfig

__all__ = ["REWARDS", "PPOConfig"]
