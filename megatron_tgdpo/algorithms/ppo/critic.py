"""The critic: built, loaded, wrapped, and run through megatron-core's schedules.

The critic is the policy's architecture at the run's layout with a scalar value head on the last
stage (``models.value_head``). Its backbone starts from ``--critic-load`` (default: the learned reward
model when ``--learned-reward-load`` is given, else ``--ref-load``): any model source (torch_dist,
converted, Hugging Face, seeded), loaded *before* the head is attached; or a PPO checkpoint, whose
``critic`` part (value head included) is loaded *after*; or a reward model (``train --loss-type rm``),
backbone and head, whose head is then rescaled so that the critic starts predicting the reward model's
*normalised* score ``(r - mean) / std`` (``normalise``), the scale of the sparse reward it learns. It is trained with its
own megatron optimizer and LR scheduler (``--critic-lr``), and checkpointed as the part ``critic``.

:func:`run_value_schedule` is ``runtime.schedule.run_schedule`` with the value head as its ``head``
in place of the vocab-parallel log-prob op: the loss function gets ``(index, batch, values)`` with ``values`` fp32
``[R, S_local]`` and returns ``(numerator, count, report)`` under the same per-count contract.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from megatron_tgdpo.checkpointing import CheckpointPart
from megatron_tgdpo.config import TrainConfig
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.models.sources import ModelSource
from megatron_tgdpo.models.value_head import attach_value_head, rescale_value_head, value_output
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.schedule import LossFn, run_schedule

__all__ = ["CRITIC", "build_critic", "run_value_schedule", "score_values"]

CRITIC = "critic"


def _ppo_checkpoint_with_critic(path: Optional[str]) -> bool:
    from megatron_tgdpo import checkpointing

    source = ModelSource.of(path)
    if source.kind != "torch_dist":
        return False
    try:
        return CRITIC in checkpointing.read_metadata(checkpointing.resolve(path)).get("parts", [])
    except checkpointing.CheckpointError:
        return False


def build_critic(arch: LlamaArch, cfg: TrainConfig, *, load: Optional[str], lr: float, train_iters: int,
                 head_init_std: float, seed: int, normalise: tuple[float, float] = (0.0, 1.0)) -> CheckpointPart:
    """The critic's chunks (value head on the last stage) wrapped with DDP, optimizer and scheduler."""
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.algorithms.reward_model import build_reward_model, is_reward_model_checkpoint

    if is_reward_model_checkpoint(load):
        chunks = build_reward_model(arch, cfg, load=load, seed=seed)
        for chunk in chunks:
            rescale_value_head(chunk, mean=normalise[0], std=normalise[1])
        return setup.wrap_trained(dataclasses.replace(cfg, lr=lr, min_lr=min(cfg.min_lr, lr)), chunks,
                                  train_iters=train_iters, lr=lr)
    chunks = setup.build_chunks(arch, cfg)
    from_ppo = _ppo_checkpoint_with_critic(load)
    if not from_ppo:
        ModelSource.of(load, seed=seed).load_into(chunks)
    for chunk in chunks:
        attach_value_head(chunk, init_std=head_init_std, seed=seed)
    if from_ppo:
        checkpointing.load_model_weights(load, chunks, part=CRITIC)
    return setup.wrap_trained(dataclasses.replace(cfg, lr=lr, min_lr=min(cfg.min_lr, lr)), chunks,
                              train_iters=train_iters, lr=lr)


def run_value_schedule(chunks: list[torch.nn.Module], microbatches: list[Batch], loss_fn: LossFn, *,
                       forward_only: bool) -> list[Any]:
    """Every micro-batch through megatron-core's schedule with the value head at the last stage; returns
    each micro-batch's ``report`` on the last pipeline stage (an empty list elsewhere)."""
    return run_schedule(chunks, microbatches, loss_fn, forward_only=forward_only,
                        head=lambda model, batch, hidden: value_output(model, hidden))


def score_values(chunks: list[torch.nn.Module], microbatches: list[Batch]) -> list[torch.Tensor]:
    """Forward-only values (fp32 ``[R, S_local]``, unmasked) per micro-batch on the last stage."""

    def collect(index: int, batch: Batch, values: torch.Tensor):
        return values.new_zeros(()), 0, values.detach()

    for chunk in chunks:
        chunk.eval()
    return run_value_schedule(chunks, microbatches, collect, forward_only=True)
