"""Supervised fine-tuning (``--loss-type sft``) as a runtime algorithm: the step, nothing else.

Token cross-entropy on the response tokens — the chosen responses of a prepared preference set —
averaged over every response token of the global batch. No frozen model. The policy starts from
``--ref-load`` (or a model directory given as ``--load``, or the seeded init), as preference training.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_tgdpo.checkpointing import POLICY, CheckpointPart
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.losses import sft_loss_sums
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext, StepResult, optimizer_step
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.schedule import LogprobSettings, local_batch, run_schedule, score_logps

__all__ = ["SFTAlgorithm"]


class SFTAlgorithm(Algorithm):
    name = "sft"
    means = ("loss",)
    eval_means = ("loss",)
    heldout_summary = (("loss", "loss", "+.4f"),)
    passes_per_token = 3.0

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.policy: Optional[CheckpointPart] = None
        self.logprobs = LogprobSettings.of(self.cfg)

    def build(self) -> None:
        chunks = setup.build_chunks(self.ctx.arch, self.cfg)
        setup.policy_start(self.cfg).load_into(chunks)
        self.policy = setup.wrap_trained(self.cfg, chunks, train_iters=self.ctx.train_iters)

    def parts(self) -> dict[str, CheckpointPart]:
        return {POLICY: self.policy}

    def describe(self) -> str:
        return "sft (token cross-entropy on chosen responses)"

    def batch_source(self, prefix: str, *, consumed_samples: int, shuffle: bool):
        from megatron_tgdpo.runtime.data import BatchSource

        return BatchSource(self.cfg, prefix, self.ctx.data.pad_id, consumed_samples=consumed_samples,
                           shuffle=shuffle, sequences=True)

    def train_step(self, batches: list[Batch]) -> StepResult:
        metrics = StepMetrics()

        def loss_fn(index: int, batch: Batch, logps: torch.Tensor):
            nll, tokens, sums = sft_loss_sums(logps, batch["loss_mask"])
            metrics.add(sums, cp_local=True)  # each CP rank's own tokens
            return nll, tokens.to(torch.int), None

        for chunk in self.policy.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.policy.optimizer.zero_grad()
        run_schedule(self.policy.chunks, batches, loss_fn, forward_only=False, logprobs=self.logprobs)
        updated, grad_norm = optimizer_step(self.policy, metrics)
        return StepResult(metrics=metrics, grad_norm=grad_norm, updated=updated)

    def evaluate(self, batches: Iterator[list[Batch]]) -> Optional[StepMetrics]:
        """Held-out per-token negative log-likelihood of the chosen responses."""
        metrics = StepMetrics()
        for global_batch in batches:
            for index, logps in enumerate(score_logps(self.policy.chunks, global_batch, logprobs=self.logprobs)):
                _, _, sums = sft_loss_sums(logps, local_batch(global_batch[index])["loss_mask"])
                metrics.add(sums, cp_local=True)
        return metrics

