"""Training methods on the shared runtime: preference (DPO, TGDPO, IPO, SimPO), SFT, PPO."""
from __future__ import annotations

# Registers --guidance-source reward-model (the reward model lives here, above the guidance plug-ins).
from megatron_tgdpo.algorithms import reward_guidance  # noqa: F401

__all__ = ["algorithm_for"]


def algorithm_for(loss_type: str) -> type:
    """The algorithm class that ``megatron_tgdpo.train`` runs for ``--loss-type`` (PPO has its own command)."""
    if loss_type == "sft":
        from megatron_tgdpo.algorithms.sft import SFTAlgorithm

        return SFTAlgorithm
    if loss_type == "rm":
        from megatron_tgdpo.algorithms.reward_model import RewardModelAlgorithm

        return RewardModelAlgorithm
    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm

    return PreferenceAlgorithm
