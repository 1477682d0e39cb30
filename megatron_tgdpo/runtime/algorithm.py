"""The interface between the runtime and a training method (preference, SFT, PPO).

The :class:`~megatron_tgdpo.runtime.trainer.Trainer` owns what is the same for every method: set-up,
resume, the step's bookkeeping (token counts, the learning rate used), evaluation and checkpoints; the
loop (:mod:`megatron_tgdpo.runtime.loop`) schedules them. An :class:`Algorithm` declares what differs:
its config section, how many iterations its data gives, which models it builds (trained and frozen
roles), what one step does, whether and on what it evaluates, how its results read on the console,
and which parts a checkpoint holds.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch

from megatron_tgdpo.checkpointing import POLICY, CheckpointPart
from megatron_tgdpo.config import TrainConfig
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.metrics import StepMetrics

__all__ = ["Algorithm", "RunContext", "StepResult", "format_summary", "optimizer_step"]

#: (metric name, console label, format spec): one entry of a console summary
SummaryField = tuple[str, str, str]


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
    """One iteration: on-device metrics (reduced only when logged), and whether the weights moved.

    The counts are this data-parallel replica's (the loop multiplies by the data-parallel size):
    ``tokens`` computed positions (padding included), ``real_tokens`` prompt and response tokens,
    ``attention_span`` the token-weighted mean number of positions a token attends over (for the FLOP
    model), ``lr`` the policy's learning rate during the step. An algorithm may leave them None: the
    :class:`~megatron_tgdpo.runtime.trainer.Trainer` then counts its micro-batches and reads
    :meth:`Algorithm.learning_rate` before the step; ``Trainer.step`` returns them all filled."""

    metrics: StepMetrics
    grad_norm: float
    updated: bool
    tokens: Optional[int] = None
    real_tokens: Optional[int] = None
    attention_span: Optional[float] = None
    lr: Optional[float] = None


def format_summary(values: dict[str, float], fields: tuple[SummaryField, ...], *, skip_nan: bool = False) -> str:
    """``label value | label value ...`` of the ``fields`` that ``values`` holds; ``skip_nan``: leave out
    the NaN ones too (metrics no rank recorded)."""
    return " | ".join(f"{label} {values[key]:{fmt}}" for key, label, fmt in fields
                      if key in values and not (skip_nan and math.isnan(values[key])))


class Algorithm(ABC):
    """A training method. ``means``/``maxima``: the metric names its steps record (see StepMetrics)."""

    name: str = "algorithm"
    #: (name, dataclass) of this method's own settings (``TrainConfig.<name>``, flags and YAML keys of
    #: the one builder in :mod:`megatron_tgdpo.config`); None: the core settings only
    config_section: ClassVar[Optional[tuple[str, type]]] = None
    means: tuple[str, ...] = ("loss",)
    maxima: tuple[str, ...] = ()
    eval_means: tuple[str, ...] = ()
    #: the held-out console line: (metric, label, format) in ``eval_means``
    heldout_summary: tuple[SummaryField, ...] = ()
    #: a second console line under the logger's for every logged step (none when empty)
    step_summary: tuple[SummaryField, ...] = ()
    #: why :meth:`evaluate` may return None (said on the console when it does)
    no_evaluation: str = "this run cannot evaluate"
    #: model passes per policy token and step, for FLOP accounting: 3 (fwd + bwd) + frozen forwards
    passes_per_token: float = 3.0

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    # ---- what the method's data and settings give -----------------------------------------------
    @classmethod
    def iterations(cls, cfg: TrainConfig, data: setup.DataSpec) -> int:
        """Iterations of the run: ``--train-iters``, or ``--train-epochs`` over the prepared training set."""
        if cfg.train_iters is not None:
            return cfg.train_iters
        from megatron_tgdpo.data import PreferenceDataset

        return max(1, math.ceil(cfg.train_epochs * len(PreferenceDataset(data.train_prefix)) / cfg.global_batch_size))

    @property
    def section(self) -> Any:
        """This method's settings (``cfg.<config_section name>``)."""
        return None if self.config_section is None else getattr(self.cfg, self.config_section[0])

    # ---- models and steps ---------------------------------------------------------------------
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

    def train_source(self, *, consumed_samples: int):
        """The training stream, continuing after ``consumed_samples``."""
        return self.batch_source(self.ctx.data.train_prefix, consumed_samples=consumed_samples, shuffle=True)

    def learning_rate(self) -> float:
        """The policy's current learning rate (the one its next step uses)."""
        return self.parts()[POLICY].optimizer.param_groups[0]["lr"]

    # ---- evaluation ---------------------------------------------------------------------------
    def eval_batches(self) -> Optional[Iterator[list[Batch]]]:
        """One evaluation's global batches: ``--eval-iters`` of the prepared held-out set, in order;
        None when this run does not evaluate (no held-out set, or ``--eval-iters 0``)."""
        prefix = self.ctx.data.eval_prefix
        if prefix is None or self.cfg.eval_iters <= 0:
            return None
        source = self.batch_source(prefix, consumed_samples=0, shuffle=False)
        return (source.next_global_batch() for _ in range(self.cfg.eval_iters))

    def evaluate(self, batches: Iterator[list[Batch]]) -> Optional[StepMetrics]:
        """Held-out metrics (names in ``eval_means``) over the given global batches; None: cannot
        evaluate (``no_evaluation`` says why)."""
        return None

    def heldout_record(self, *, iteration: int, values: dict[str, float]) -> Optional[dict]:
        """A row for ``<log-dir>/heldout.jsonl`` after each evaluation (None: no file)."""
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
