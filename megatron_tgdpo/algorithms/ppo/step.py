"""The PPO update: ``--ppo-epochs`` passes over the rollout, ``--ppo-mini-batches`` optimizer steps each.

Each mini-batch is a seeded shuffle of this rank's rollout rows (keyed by (seed, iteration, epoch): the
same on every rank of a model-parallel group, and after a resume). For each mini-batch the actor runs
forward+backward through megatron-core's schedule with the clipped policy loss, then steps; the critic
does the same with the clipped value loss. Both losses are means over the global mini-batch — per token, or
per response with ``--ppo-loss-averaging sequence`` (numerator and count per micro-batch;
``calculate_per_token_loss``), and each optimizer step is guarded
against NaN/Inf (``runtime.algorithm.optimizer_step``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.algorithms.ppo.critic import run_value_schedule
from megatron_tgdpo.algorithms.ppo.rollout import Rollout
from megatron_tgdpo.checkpointing import CheckpointPart
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.losses.ppo import policy_loss_sums, value_loss_sums
from megatron_tgdpo.runtime.algorithm import optimizer_step
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.schedule import LogprobSettings, run_schedule

__all__ = ["TRAIN_MEANS", "UpdateResult", "ppo_update"]

POLICY_LOSS, VALUE_LOSS = "ppo/policy_loss", "ppo/value_loss"
TRAIN_MEANS = (POLICY_LOSS, "ppo/clip_fraction", "ppo/approx_kl", "ppo/ratio", VALUE_LOSS, "ppo/value_clip_fraction",
               "critic/grad_norm", "ppo/skipped_steps")
PER_TOKEN = ("old_logps", "advantages", "returns", "values")


@dataclass
class UpdateResult:
    updated: bool  # every actor and critic step updated (none was skipped as non-finite)
    grad_norm: float  # the actor's, averaged over its steps


def minibatch_order(n: int, *, seed: int, iteration: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, 0x990, int(iteration), int(epoch)])).permutation(n)


def _merge(into: StepMetrics, part: StepMetrics) -> None:
    for name, (total, count) in part.sums.items():
        if name in into.sums:
            old_total, old_count = into.sums[name]
            total, count = old_total + total, old_count + count
        into.sums[name] = (total, count)
    for name, value in part.maxima.items():
        into.maxima[name] = torch.maximum(into.maxima[name], value) if name in into.maxima else value


def _train(part: CheckpointPart, run, batches: list[Batch], loss_fn, loss_key: str) -> tuple[StepMetrics, bool, float]:
    metrics = StepMetrics()

    def wrapped(index: int, batch: Batch, output: torch.Tensor):
        loss, count, sums = loss_fn(batch, output)
        metrics.add(sums)
        return loss, count.to(torch.int), None

    for chunk in part.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    part.optimizer.zero_grad()
    run(part.chunks, batches, wrapped)
    updated, grad_norm = optimizer_step(part, metrics, loss_key=loss_key)
    return metrics, updated, grad_norm


def ppo_update(rollout: Rollout, *, actor: CheckpointPart, critic: CheckpointPart, ppo: PPOConfig, seed: int,
               micro_batch_size: int, logprobs: LogprobSettings, metrics: StepMetrics) -> UpdateResult:
    n = len(rollout)
    per_mini = n // ppo.ppo_mini_batches

    def policy_loss(batch: Batch, logps: torch.Tensor):
        return policy_loss_sums(logps, batch["old_logps"], batch["advantages"], batch["loss_mask"],
                                clip_range=ppo.clip_range, averaging=ppo.ppo_loss_averaging)

    def value_loss(batch: Batch, values: torch.Tensor):
        return value_loss_sums(values, batch["values"], batch["returns"], batch["loss_mask"],
                               clip_range=ppo.value_clip, averaging=ppo.ppo_loss_averaging)

    def run_actor(chunks, batches, fn):
        run_schedule(chunks, batches, fn, forward_only=False, logprobs=logprobs)

    def run_critic(chunks, batches, fn):
        run_value_schedule(chunks, batches, fn, forward_only=False)

    all_updated, norms = True, []
    device = rollout.mask.device
    for epoch in range(ppo.ppo_epochs):
        order = minibatch_order(n, seed=seed, iteration=rollout.iteration, epoch=epoch)
        for m in range(ppo.ppo_mini_batches):
            batches = rollout.micro_batches(order[m * per_mini:(m + 1) * per_mini], micro_batch_size, extra=PER_TOKEN)
            actor_metrics, actor_ok, actor_norm = _train(actor, run_actor, batches, policy_loss, POLICY_LOSS)
            critic_metrics, critic_ok, critic_norm = _train(critic, run_critic, batches, value_loss, VALUE_LOSS)
            _merge(metrics, actor_metrics)
            _merge(metrics, critic_metrics)
            one = torch.ones((), dtype=torch.float64, device=device)
            metrics.add({"critic/grad_norm": (torch.tensor(critic_norm, dtype=torch.float64, device=device), one),
                         "ppo/skipped_steps": (torch.tensor(float(not actor_ok) + float(not critic_ok),
                                                            dtype=torch.float64, device=device), one)})
            all_updated &= actor_ok and critic_ok
            norms.append(actor_norm)
    return UpdateResult(updated=all_updated, grad_norm=float(np.mean(norms)))
