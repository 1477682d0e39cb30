"""A Bradley–Terry reward model as TGDPO's guidance source (``--guidance-source reward-model``).

    megatron-tgdpo train --loss-type rm --save rm/ ...                  # the reward model
    megatron-tgdpo train --loss-type tgdpo --guidance-source reward-model --guidance-load rm/ ...

The per-token reward of response token ``y_t`` is the change of the reward model's value when the
token is read::

    r̂_t = scale · (V(x, y≤t) − V(x, y<t))          scale: --guidance-scale (default 1)

``V(x, y≤t)`` is the value head's output at the position whose input is ``y_t`` (for the first
response token, ``V(x, y<t)`` is the value at the last prompt position). Along a response the r̂_t
sum to ``scale · (r(x, y) − V(x))``: the sequence score the model was trained on, less a per-prompt
constant that cancels between the chosen and the rejected response of a pair.

Why the default scale is 1: the reward model is trained with ``-log sigmoid(r_w − r_l)``, and DPO's
implicit reward ``β·log(π/π_ref)`` is a Bradley–Terry reward under exactly that loss, so both sources'
per-token rewards are in the same units (log-odds of preferring one response) and ``--alpha`` means
the same with either. Dividing by the scores' standard deviation would change those units for each
model; ``--guidance-scale 1/std`` (the ``score_std`` of the reward model's ``heldout.jsonl``) does it
when wanted.

The model is built once (:meth:`RewardModelSource.setup`) in the run's own parallel layout (TP, SP,
PP with virtual stages, DP; rows, packed rows and shared prompts alike; the checkpoint may come from
any layout) and scores each step's micro-batches forward-only before the policy's forward; the scores
live on the last pipeline stage, where the loss asks for them. Context parallelism is refused (a
difference of values at consecutive positions would cross context-parallel slices).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.guidance import GuidanceSource, ResponseLayout, register_guidance_source

__all__ = ["NAME", "RewardModelSource"]

NAME = "reward-model"


class RewardModelSource(GuidanceSource):
    name = NAME
    roles = ()  # no causal-LM log-probs: the source runs its own model
    forward_passes = 1.0

    def __init__(self, section: Any):
        super().__init__(section)
        self.scale = float(section.guidance_scale)
        self.chunks: Optional[list[torch.nn.Module]] = None
        self.scores: list[torch.Tensor] = []

    @classmethod
    def problems(cls, section: Any) -> list[str]:
        load = section.guidance_load
        if load is None:
            return [f"--guidance-source {NAME} needs --guidance-load: a checkpoint saved by "
                    "`megatron-tgdpo train --loss-type rm`"]
        if not os.path.exists(load):
            return []  # the path checks say it is missing, once
        from megatron_tgdpo.algorithms.reward_model import is_reward_model_checkpoint

        if not is_reward_model_checkpoint(load):
            return [f"--guidance-load {load}: not a reward model checkpoint (one saved by --loss-type rm); train "
                    "one with `megatron-tgdpo train --loss-type rm`, or use --guidance-source dpo-model"]
        return []

    def setup(self, *, cfg: Any, arch: Any) -> None:
        from megatron_tgdpo.algorithms.reward_model import build_reward_model
        from megatron_tgdpo.checkpointing import CheckpointError
        from megatron_tgdpo.config import ConfigError

        if cfg.context_parallel_size > 1:
            raise ConfigError(f"--guidance-source {NAME} does not work with --context-parallel-size "
                              f"{cfg.context_parallel_size} (a token's reward is a difference of values at "
                              "consecutive positions); use --context-parallel-size 1")
        try:
            self.chunks = build_reward_model(arch, cfg, load=self.section.guidance_load, seed=cfg.seed)
        except CheckpointError as exc:
            raise ConfigError(f"--guidance-load {self.section.guidance_load}: {exc}") from None
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)

    def begin_step(self, batches: Sequence[Batch]) -> None:
        from megatron_tgdpo.algorithms.reward_model import reward_model_token_scores

        if self.chunks is None:
            raise RuntimeError(f"guidance source {NAME}: begin_step before setup")
        self.scores = reward_model_token_scores(self.chunks, list(batches))

    def token_rewards(self, *, index: int, layout: ResponseLayout, logps: Mapping[str, torch.Tensor],
                      beta: float) -> torch.Tensor:
        if index >= len(self.scores):
            raise RuntimeError(f"guidance source {NAME}: no scores for micro-batch {index} (scores exist on the "
                               "last pipeline stage, after begin_step)")
        with torch.no_grad():
            full = self.scores[index].to(layout.sign.dtype)
            if self.scale != 1.0:
                full = full * self.scale
            return layout.local(full)


register_guidance_source(NAME, RewardModelSource)
