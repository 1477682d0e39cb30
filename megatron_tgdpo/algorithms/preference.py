"""Preference optimisation — DPO, TGDPO, IPO, SimPO — as a runtime algorithm: the step, nothing else.

One iteration: the policy runs forward+backward through megatron-core's schedule with the loss at the
last stage, and the frozen reference (and, for TGDPO, guidance) model scores each micro-batch
forward-only inside the policy's forward step of that micro-batch (one schedule, one pipeline pass:
``runtime/frozen.py``), or the offline log-prob cache supplies those log-probs; the optimizer steps
unless the loss or gradient is non-finite. Frozen models are built only for roles the loss reads: SimPO uses no
reference, and a run with ``--logprob-cache`` builds no frozen model at all.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_tgdpo.checkpointing import POLICY, CheckpointPart
from megatron_tgdpo.config import ConfigError
from megatron_tgdpo.config import PreferenceConfig
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.guidance import (ResponseLayout, make_guidance_source, make_weight_function, source_problems,
                                     weight_settings_of)
from megatron_tgdpo.losses import preference_loss_sums
from megatron_tgdpo.models.sources import ModelSource
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext, StepResult, optimizer_step
from megatron_tgdpo.runtime.frozen import logps_key
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.schedule import LogprobSettings, context_parallel, local_batch, run_schedule, score_frozen

__all__ = ["PreferenceAlgorithm"]

BASE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected", "logits/mean")
TGDPO_METRICS = ("weights/chosen_mean", "weights/rejected_mean", "weights/negative_fraction")


def _abs_max_logratio(logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor):
    """max |log pi - log ref| over the trained tokens of one micro-batch, as a deferred computation."""
    return lambda: ((logps - ref) * mask).abs().max()


class PreferenceAlgorithm(Algorithm):
    name = "preference"
    config_section = ("preference", PreferenceConfig)
    heldout_summary = (("loss", "loss", "+.4f"), ("rewards/chosen", "chosen", "+.4f"),
                       ("rewards/rejected", "rejected", "+.4f"), ("rewards/accuracy", "reward accuracy", ".3f"),
                       ("rewards/margin", "margin", "+.4f"))
    no_evaluation = "it needs the reference model, which this run does not build"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        cfg, pref = self.cfg, self.section
        self.cache = None
        self.frozen: dict[str, list] = {}
        self.policy: Optional[CheckpointPart] = None
        self.uses_reference = cfg.loss_type != "simpo"
        # Token guidance as plug-ins (megatron_tgdpo.guidance): a weight function of the per-token reward
        # that a guidance source gives. alpha = 0 or no guidance makes TGDPO plain DPO, as it always did.
        self.weigh = self.source = None
        if cfg.loss_type == "tgdpo":
            self.weigh = make_weight_function(pref.token_weight, weight_settings_of(pref, seed=cfg.seed))
        self.guided = self.weigh is not None and (not self.weigh.uses_reward or (
            not self.weigh.is_identity() and not source_problems(pref.guidance_source, pref)))
        if self.guided and self.weigh.uses_reward:
            from megatron_tgdpo.guidance.score_file import ScoreFileError

            try:
                self.source = make_guidance_source(pref.guidance_source, pref)
            except ScoreFileError as exc:  # a bad file is a flag to fix: exit 2 with its line
                raise ConfigError(f"--guidance-scores {exc}") from None
        self.guide_model = self.source is not None and "guidance" in self.source.roles
        means = BASE_METRICS + (TGDPO_METRICS if self.guided else ())
        if self.guided and pref.weight_clamp() is not None:
            means += ("weights/clamped_fraction",)
        self.means = means
        self.maxima = ("logratio/abs_max",) if self.uses_reference else ()
        self.eval_means = BASE_METRICS
        self.logprobs = LogprobSettings.of(cfg)
        frozen = 0 if pref.logprob_cache else int(self.uses_reference) + int(self.guide_model)
        self.passes_per_token = 3.0 + frozen + (self.source.forward_passes if self.source is not None else 0.0)

    # ---- models -------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, pref, arch = self.cfg, self.section, self.ctx.arch
        online = pref.logprob_cache is None
        if self.uses_reference and online:
            self.frozen["reference"] = setup.build_frozen(arch, cfg, ModelSource.of(cfg.ref_load, seed=cfg.seed))
        policy = setup.build_chunks(arch, cfg)
        start = setup.policy_start(cfg)
        reference = self.frozen.get("reference")
        if reference is not None and start == ModelSource.of(cfg.ref_load, seed=cfg.seed):
            for dst, src in zip(policy, reference):  # the policy starts as an exact copy of the reference
                dst.load_state_dict(src.state_dict())
        else:
            start.load_into(policy)
        if self.source is not None:
            self.source.setup(cfg=cfg, arch=arch)
        if self.guide_model and online:
            self.frozen["guidance"] = setup.build_frozen(arch, cfg, ModelSource.of(pref.guidance_load, seed=cfg.seed))
        if not online:
            from megatron_tgdpo.logprob_cache import LogprobCache, LogprobCacheError

            try:
                self.cache = LogprobCache(
                    pref.logprob_cache, dataset_prefix=self.ctx.data.train_prefix, ref_load=cfg.ref_load,
                    guidance_load=pref.guidance_load, seed=cfg.seed, need_guidance=self.guide_model, model=cfg.model,
                )
            except LogprobCacheError as exc:  # a cache of another run or a damaged one: a flag to fix, exit 2
                raise ConfigError(f"--logprob-cache {pref.logprob_cache}: {exc}") from None
        self.policy = setup.wrap_trained(cfg, policy, train_iters=self.ctx.train_iters)

    def parts(self) -> dict[str, CheckpointPart]:
        return {POLICY: self.policy}

    def describe(self) -> str:
        frozen = "log-prob cache" if self.cache is not None else (", ".join(self.frozen) or "none")
        return f"{self.cfg.loss_type} (frozen: {frozen})"

    # ---- one step -----------------------------------------------------------------------------
    def _with_cached_logps(self, batches: list[Batch]) -> list[Batch]:
        """The micro-batches carrying the cache's log-probs where online scoring puts them."""
        from megatron_tgdpo.logprob_cache import attach_cached_logps

        return attach_cached_logps(self.cache, batches)

    def _loss_options(self) -> dict:
        cfg, pref = self.cfg, self.section
        options = dict(beta=cfg.beta, alpha=pref.alpha, loss_type=cfg.loss_type)
        if pref.label_smoothing:
            options["label_smoothing"] = pref.label_smoothing
        if pref.weight_clamp() is not None and not self.guided:
            options["weight_clamp"] = pref.weight_clamp()  # a guided run's plug-in applies it instead
        if cfg.loss_type == "simpo":
            options["simpo_gamma"] = pref.simpo_gamma
        return options

    def _token_weights(self, index: int, full: Batch, batch: Batch, logps: torch.Tensor,
                       frozen: dict[str, torch.Tensor]) -> dict:
        """The loss options carrying micro-batch ``index``'s token weights (``batch``: this rank's slice)."""
        _, _, cp_group = context_parallel()
        layout = ResponseLayout.of(full, sliced=batch, cp_group=cp_group, dtype=logps.dtype)
        if self.source is None:
            reward = torch.zeros_like(logps)
        else:
            from megatron_tgdpo.guidance.score_file import ScoreFileError

            try:
                reward = self.source.token_rewards(index=index, layout=layout, logps=frozen, beta=self.cfg.beta)
            except ScoreFileError as exc:  # a pair the file lacks or miscounts: the file is to fix, exit 2
                raise ConfigError(f"--guidance-scores {exc}") from None
        weights = self.weigh(reward, layout)
        out = {"token_weights": weights.weights}
        if self.section.weight_clamp() is not None:
            out["clamped_tokens"] = weights.clamped
        return out

    def _pair_loss(self, batch: Batch, logps: torch.Tensor, ref: Optional[torch.Tensor],
                   guide: Optional[torch.Tensor], *, options: dict):
        cp_rank, _, cp_group = context_parallel()
        packed = {"sequence_ids": batch["sequence_ids"], "num_sequences": batch.num_sequences} if batch.packed else {}
        out = preference_loss_sums(logps, ref, batch["loss_mask"], guide_logps=guide, cp_group=cp_group,
                                   **packed, **options)
        # The loss is CP-global (every CP rank evaluates it from all-reduced sums, its backward giving the
        # gradient through its own tokens): count each pair once per data-parallel replica.
        count = batch.num_pairs if cp_rank == 0 else 0
        return out, count

    def train_step(self, batches: list[Batch]) -> StepResult:
        if self.cache is not None:
            batches = self._with_cached_logps(batches)
        options = self._loss_options()
        metrics = StepMetrics()
        if self.source is not None:
            self.source.begin_step(batches)
        ref_key = logps_key("reference")
        frozen_keys = {role: logps_key(role) for role in ("reference", "guidance")}

        def loss_fn(index: int, batch: Batch, logps: torch.Tensor):
            if batch.num_pairs == 0:  # a padding micro-batch (interleaved schedule filler)
                return (logps * 0).sum(), 0, None
            ref = batch.get(ref_key)
            step_options = options
            if self.guided:
                frozen = {role: batch[key] for role, key in frozen_keys.items() if key in batch}
                step_options = {**options, **self._token_weights(index, batches[index], batch, logps, frozen)}
            out, count = self._pair_loss(batch, logps, ref, None, options=step_options)
            metrics.add(out.metrics)
            if ref is not None:  # a log-only value: computed when the step's metrics are reduced
                metrics.add_max_when_reduced("logratio/abs_max", _abs_max_logratio(logps.detach(), ref,
                                                                                   batch["loss_mask"]), cp_local=True)
            return out.losses.sum(), count, None

        for chunk in self.policy.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.policy.optimizer.zero_grad()
        run_schedule(self.policy.chunks, batches, loss_fn, forward_only=False, logprobs=self.logprobs,
                     frozen=self.frozen)
        updated, grad_norm = optimizer_step(self.policy, metrics)
        return StepResult(metrics=metrics, grad_norm=grad_norm, updated=updated)

    # ---- held-out ----------------------------------------------------------------------------
    def evaluate(self, batches: Iterator[list[Batch]]) -> Optional[StepMetrics]:
        """DPO implicit-reward metrics of the current policy against the reference (SimPO: its own)."""
        reference = self.frozen.get("reference")
        if self.uses_reference and reference is None:
            return None  # the cache holds training-set log-probs only
        options = dict(beta=self.cfg.beta, loss_type="dpo" if self.uses_reference else "simpo")
        metrics = StepMetrics()
        models = {"policy": self.policy.chunks, **({"reference": reference} if reference is not None else {})}
        for global_batch in batches:
            scored = score_frozen(models, global_batch, logprobs=self.logprobs)  # one forward-only pass
            ref = scored.get("reference")
            for index, logps in enumerate(scored["policy"]):
                if global_batch[index].num_pairs == 0:
                    continue
                out, _ = self._pair_loss(local_batch(global_batch[index]), logps,
                                         None if ref is None else ref[index], None, options=options)
                metrics.add(out.metrics)
        return metrics
