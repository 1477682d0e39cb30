"""A Bradley–Terry reward model (``--loss-type rm``) as a runtime algorithm, and the functions that score with one.

The model is the policy's architecture with the PPO critic's scalar head (``models.value_head``) on the
last stage: the backbone starts from ``--ref-load`` (or a model directory given as ``--load``), the head
from seeded normal weights of standard deviation ``1/(H+1)`` (a zero head would give the backbone no
gradient on the first step) and a zero bias that is not trained (the loss depends on score differences
only). It trains on the prepared preference pairs: each pair's chosen and
rejected sequences are scored at their last token (``losses.reward_model``) and the loss is
``-log sigmoid(r_w - r_l - --rm-margin)``, a mean over the pairs of the global batch. Held-out
evaluation reports the loss, the pairwise accuracy and the mean and standard deviation of the scores
(``rm/score_mean``, ``rm/score_std`` in ``heldout.jsonl``: what a consumer normalises the scores with).

A checkpoint holds the part ``policy`` with the head as ``value_head.*`` and the run's config
(``loss_type: rm``), which is how :func:`is_reward_model_checkpoint` recognises one.

Layouts: TP, SP, PP (virtual too), DP, the rows and the packed layout. Context parallelism is refused
(the score is one position of each sequence, held by one CP rank).

Scoring (forward only, any layout, last pipeline stage): :func:`score_sequences` gives per-sequence
scores, :func:`reward_model_token_scores` per-token value differences ``V(s_{k+1}) - V(s_k)`` (the
guidance source for token-weighted preference losses).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from megatron_tgdpo.checkpointing import POLICY, CheckpointPart
from megatron_tgdpo.config import ConfigError, PreferenceConfig, TrainConfig
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.losses.reward_model import bradley_terry_loss_sums, sequence_scores, token_value_differences
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.models.sources import is_reward_model_checkpoint
from megatron_tgdpo.models.state_dict import gpt_model
from megatron_tgdpo.models.value_head import VALUE_HEAD, attach_value_head, has_value_head, value_output
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext, StepResult, optimizer_step
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.schedule import run_schedule

__all__ = ["RewardModelAlgorithm", "build_reward_model", "is_reward_model_checkpoint", "reward_model_token_scores",
           "score_sequences"]

RM_METRICS = ("loss", "rm/accuracy", "rm/chosen", "rm/rejected", "rm/margin")
EVAL_METRICS = RM_METRICS + ("rm/score", "rm/score_sq")


def head_init_std(arch: LlamaArch) -> float:
    return 1.0 / (arch.hidden_size + 1)


def build_reward_model(arch: LlamaArch, cfg: TrainConfig, *, load: str, seed: int) -> list[torch.nn.Module]:
    """Unwrapped chunks of a trained reward model (backbone + head) loaded from an ``rm`` checkpoint."""
    from megatron_tgdpo import checkpointing

    chunks = setup.build_chunks(arch, cfg)
    for chunk in chunks:
        attach_value_head(chunk, init_std=head_init_std(arch), seed=seed)
    checkpointing.load_model_weights(load, chunks, part=POLICY)
    return chunks


def _run_values(chunks: list[torch.nn.Module], microbatches: list[Batch], loss_fn, *, forward_only: bool) -> list:
    return run_schedule(chunks, microbatches, loss_fn, forward_only=forward_only,
                        head=lambda model, batch, hidden: value_output(model, hidden))


def _packed_args(batch: Batch) -> dict:
    return {"sequence_ids": batch["sequence_ids"], "num_sequences": batch.num_sequences} if batch.packed else {}


def score_sequences(chunks: list[torch.nn.Module], microbatches: list[Batch]) -> list[torch.Tensor]:
    """Forward-only fp32 ``[N]`` sequence scores per micro-batch (last pipeline stage; an empty list
    elsewhere). Sequences in the batch's order (pairs: chosen then rejected). No context parallelism."""

    def collect(index: int, batch: Batch, values: torch.Tensor):
        return values.new_zeros(()), 0, sequence_scores(values.detach(), batch["loss_mask"], **_packed_args(batch))

    for chunk in chunks:
        chunk.eval()
    return _run_values(chunks, microbatches, collect, forward_only=True)


def reward_model_token_scores(chunks: list[torch.nn.Module], microbatches: list[Batch]) -> list[torch.Tensor]:
    """Forward-only per-token scores ``V(s_{k+1}) - V(s_k)`` of each response token, fp32 ``[R, S]`` per
    micro-batch at the token's label position (where token log-probs sit), 0 off ``loss_mask``; last
    pipeline stage only (an empty list elsewhere). They sum over a response to ``r(x, y) - V(x)``."""

    def collect(index: int, batch: Batch, values: torch.Tensor):
        return values.new_zeros(()), 0, token_value_differences(values.detach(), batch["loss_mask"])

    for chunk in chunks:
        chunk.eval()
    return _run_values(chunks, microbatches, collect, forward_only=True)


class RewardModelAlgorithm(Algorithm):
    name = "rm"
    config_section = ("preference", PreferenceConfig)
    means = RM_METRICS
    eval_means = EVAL_METRICS
    heldout_summary = (("loss", "loss", "+.4f"), ("rm/accuracy", "pairwise accuracy", ".3f"),
                       ("rm/margin", "margin", "+.4f"), ("rm/score", "score mean", "+.4f"))
    passes_per_token = 3.0

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.model: Optional[CheckpointPart] = None
        if self.cfg.context_parallel_size > 1:
            raise ConfigError(f"--context-parallel-size {self.cfg.context_parallel_size}: --loss-type rm reads each "
                              "sequence's score at one position; use --context-parallel-size 1")

    def build(self) -> None:
        arch, cfg = self.ctx.arch, self.cfg
        chunks = setup.build_chunks(arch, cfg)
        setup.policy_start(cfg).load_into(chunks)
        for chunk in chunks:
            attach_value_head(chunk, init_std=head_init_std(arch), seed=cfg.seed)
            # The loss reads score differences only: the head's bias has no gradient but rounding noise, which
            # Adam would turn into full-size steps of random sign. It stays 0 (a critic trains it).
            if has_value_head(chunk):
                getattr(gpt_model(chunk), VALUE_HEAD).bias.requires_grad_(False)
        self.model = setup.wrap_trained(cfg, chunks, train_iters=self.ctx.train_iters)

    def parts(self) -> dict[str, CheckpointPart]:
        return {POLICY: self.model}

    def describe(self) -> str:
        margin = self.section.rm_margin
        return "rm (Bradley-Terry reward model, score at the last token" + (f", margin {margin})" if margin else ")")

    def _pair_sums(self, batch: Batch, values: torch.Tensor):
        scores = sequence_scores(values, batch["loss_mask"], **_packed_args(batch))
        pairs = batch.num_pairs
        return scores, bradley_terry_loss_sums(scores[:pairs], scores[pairs:2 * pairs], margin=self.section.rm_margin)

    def train_step(self, batches: list[Batch]) -> StepResult:
        metrics = StepMetrics()

        def loss_fn(index: int, batch: Batch, values: torch.Tensor):
            if batch.num_pairs == 0:  # a padding micro-batch (interleaved schedule filler)
                return (values * 0).sum(), 0, None
            _, (loss, count, sums) = self._pair_sums(batch, values)
            metrics.add(sums)
            return loss, batch.num_pairs, None

        for chunk in self.model.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.model.optimizer.zero_grad()
        _run_values(self.model.chunks, batches, loss_fn, forward_only=False)
        updated, grad_norm = optimizer_step(self.model, metrics)
        return StepResult(metrics=metrics, grad_norm=grad_norm, updated=updated)

    def evaluate(self, batches: Iterator[list[Batch]]) -> Optional[StepMetrics]:
        """Held-out loss, pairwise accuracy, and the scores' mean and second moment (over every sequence)."""
        metrics = StepMetrics()

        def collect(index: int, batch: Batch, values: torch.Tensor):
            if batch.num_pairs == 0:
                return values.new_zeros(()), 0, None
            scores, (_, _, sums) = self._pair_sums(batch, values.detach())
            n = torch.tensor(float(scores.numel()), device=scores.device)
            sums = {**sums, "rm/score": (scores.float().sum(), n), "rm/score_sq": ((scores.float() ** 2).sum(), n)}
            metrics.add(sums)
            return values.new_zeros(()), 0, None

        for chunk in self.model.chunks:
            chunk.eval()
        for global_batch in batches:
            _run_values(self.model.chunks, global_batch, collect, forward_only=True)
        return metrics

    def heldout_record(self, *, iteration: int, values: dict[str, float]) -> Optional[dict]:
        mean, second = values.get("rm/score", math.nan), values.get("rm/score_sq", math.nan)
        std = math.sqrt(max(second - mean * mean, 0.0)) if math.isfinite(mean) and math.isfinite(second) else math.nan
        return {"iteration": iteration, "loss": values.get("loss"), "accuracy": values.get("rm/accuracy"),
                "margin": values.get("rm/margin"), "score_mean": mean, "score_std": std}
