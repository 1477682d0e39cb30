"""The interface between the shared loop and a training method (preference, SFT, PPO).

The loop (:mod:`megatron_tgdpo.runtime.loop`) owns everything that is the same for every method:
set-up, resume, the stop/save/eval/log cadence, throughput, the non-finite guard's patience, the
checkpoint lock. An :class:`Algorithm` owns what differs: which models it builds (trained and frozen
roles), what one step does, how it evaluates, and which parts a checkpoint holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_tgdpo.checkpointing import CheckpointPart
from megatron_tgdpo.config import TrainConfig
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.metrics import StepMetrics

__all__ = ["Algorithm", "RunContext", "StepResult", "optimizer_step"]


@dataclass(frozen=True)
class RunContext:
    """What set-up decided, handed to the algorithm."""

    cfg: TrainConfig
    arch: LlamaArch
    arch_name: str
    data: setup.DataSpec
    train_iters: int


@dataclass
class StepResult:
    """One iteration: on-device metrics (reduced only when logged), and whether the weights moved."""

    metrics: StepMetrics
    grad_norm: float
    updated: bool


class Algorithm(ABC):
    """A training method. ``means``/``maxima``: the metric names its steps record (see StepMetrics)."""

    name: str = "algorithm"
    means: tuple[str, ...] = ("loss",)
    maxima: tuple[str, ...] = ()
    eval_means: tuple[str, ...] = ()
    #: model passes per policy token and step, for FLOP accounting: 3 (fwd + bwd) + frozen forwards
    passes_per_token: float = 3.0

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    @abstractmethod
    def build(self) -> None:
        """Build (and load) the models; called once after the parallel state exists."""

    @abstractmethod
    def parts(self) -> dict[str, CheckpointPart]:
        """The trained state a checkpoint holds, by name (``policy`` first)."""

    @abstractmethod
    def train_step(self, batches: list[Batch]) -> StepResult:
        """One iteration on this rank's micro-batches of the global batch, optimizer step included."""

    def batch_source(self, prefix: str, *, consumed_samples: int, shuffle: bool):
        """Where this algorithm's micro-batches come from (pairs by default)."""
        from megatron_tgdpo.runtime.data import BatchSource

        return BatchSource(self.cfg, prefix, self.ctx.data.pad_id, consumed_samples=consumed_samples, shuffle=shuffle)

    def evaluate(self, batches: Iterator[list[Batch]]) -> Optional[StepMetrics]:
        """Held-out metrics (names in ``eval_means``) over the given global batches; None: no evaluation."""
        return None

    def describe(self) -> str:
        return self.name


def optimizer_step(part: CheckpointPart, metrics: StepMetrics, *, loss_key: str = "loss") -> tuple[bool, float]:
    """Step ``part``'s optimizer unless the loss (any rank's) or the gradient norm is NaN/Inf.

    Every rank learns whether any reporting rank saw a non-finite loss (one small all-reduce), then
    :func:`megatron_tgdpo.compat.guarded_optimizer_step` computes the global grad norm and updates only
    when both are finite. Returns ``(updated, grad_norm)``; the LR scheduler advances only on updates."""
    import torch.distributed as dist

    from megatron_tgdpo import compat
    from megatron_tgdpo.distributed import current_device

    flag = torch.zeros(1, dtype=torch.float32, device=current_device())
    if loss_key in metrics.sums:
        flag += (~torch.isfinite(metrics.sums[loss_key][0])).float()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    updated, grad_norm = compat.guarded_optimizer_step(part.optimizer, loss_finite=bool(flag.item() == 0))
    if updated and part.scheduler is not None:
        part.scheduler.step(increment=1)
    return updated, grad_norm
