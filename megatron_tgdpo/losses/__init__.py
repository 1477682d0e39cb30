"""Losses on per-token log-probabilities: preference (DPO, TGDPO, IPO, SimPO) and SFT.

``megatron_tgdpo.losses.preference_loss`` is the public contract (see ``docs/loss.md``); each loss
module also offers a *summable* form (sums and counts) for trainers whose micro-batches hold a varying
number of pairs or tokens.
"""
from megatron_tgdpo.losses.preference import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_SIMPO_GAMMA,
    LOSS_TYPES,
    MetricSums,
    PreferenceLossSums,
    WeightClamp,
    all_reduce_sum_identity_grad,
    preference_loss,
    preference_loss_sums,
    tgdpo_token_weights,
)
from megatron_tgdpo.losses.sft import sft_loss_sums
from megatron_tgdpo.losses.ppo import gae, masked_whiten, policy_loss_sums, token_rewards, value_loss_sums  # noqa: F401

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_SIMPO_GAMMA",
    "LOSS_TYPES",
    "MetricSums",
    "PreferenceLossSums",
    "WeightClamp",
    "all_reduce_sum_identity_grad",
    "preference_loss",
    "preference_loss_sums",
    "sft_loss_sums",
    "tgdpo_token_weights",
]
