"""PPO (with RTO's dense DPO token reward) as a runtime algorithm.

One iteration of the shared loop (``runtime.loop``) = one rollout and its update:

1. the loop hands over this data-parallel rank's prompts (``prompts.PromptSource``: the stream position
   is the loop's consumed-samples count, so resuming continues the stream);
2. ``rollout``: sample ``--samples-per-prompt`` responses per prompt from the current actor, lay them out
   as rows, score every token — actor (behaviour) log-probs, reference log-probs, the DPO reward model's
   log-probs, critic values;
3. ``rewards`` + ``advantages``: sequence scores, token rewards, GAE, whitening;
4. ``step``: ``--ppo-epochs`` x ``--ppo-mini-batches`` clipped-loss updates of the actor and the critic.

Models: actor = the trained policy (checkpoint part ``policy``), critic = backbone + value head (part
``critic``), frozen reference (``--ref-load``), frozen DPO reward model (``--reward-model-load``, dense
rewards only). A checkpoint holds both trained parts with their optimizers and schedulers, the RNG
state and the prompt-stream position; sampling is keyed by the seed and the prompts' stream positions,
so a resumed run is bit-identical to an uninterrupted one.

Iterations: ``--train-iters``, or ``--train-epochs`` over the prompt file. Held-out evaluation
(``--eval-prompts``): greedy responses of the actor, scored by the verifier: the loop calls it before
training, every ``--eval-interval`` iterations and after training; the Trainer appends each result to
``<log-dir>/heldout.jsonl`` (:meth:`PPOAlgorithm.heldout_record`: with the number of rollout samples
used so far).
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Optional

import torch

from megatron_tgdpo.algorithms.ppo import advantages as adv
from megatron_tgdpo.algorithms.ppo import rollout as ro
from megatron_tgdpo.algorithms.ppo.config import PPOConfig, layout_problems
from megatron_tgdpo.algorithms.ppo.critic import CRITIC, build_critic, score_values
from megatron_tgdpo.algorithms.ppo.prompts import PromptBatch, PromptSet, PromptSource, check_lengths, encode_prompt_file
from megatron_tgdpo.algorithms.ppo.rewards import SequenceScorer, decode_response, scores_on_last_stage
from megatron_tgdpo.algorithms.ppo.step import TRAIN_MEANS, ppo_update
from megatron_tgdpo.algorithms.reward_model import build_reward_model, is_reward_model_checkpoint, score_sequences
from megatron_tgdpo.checkpointing import POLICY, CheckpointPart
from megatron_tgdpo.config import ConfigError, TrainConfig
from megatron_tgdpo.models.sources import ModelSource
from megatron_tgdpo.runtime import setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext, StepResult
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.schedule import LogprobSettings
from megatron_tgdpo.runtime.setup import DataSpec

__all__ = ["EVAL_MEANS", "PPOAlgorithm"]

EVAL_MEANS = ("heldout/score", "heldout/exact_match", "heldout/response_length")
TIME_MEANS = ("rollout/samples", "rollout/tokens_per_s", "time/rollout_s", "time/score_s", "time/update_s")


class PPOAlgorithm(Algorithm):
    name = "ppo"
    config_section = ("ppo", PPOConfig)
    means = adv.ROLLOUT_MEANS + TRAIN_MEANS + TIME_MEANS
    maxima = adv.ROLLOUT_MAXIMA
    eval_means = EVAL_MEANS
    heldout_summary = (("heldout/score", "score", ".4f"), ("heldout/exact_match", "exact match", ".4f"),
                       ("heldout/response_length", "response length", ".2f"))
    #: the PPO line printed under the logger's for every logged step
    step_summary = (("score", "score", ".3f"), ("reward/total", "reward", "+.3f"), ("reward/dense", "dense", "+.3f"),
                    ("reward/sparse", "sparse", "+.3f"), ("kl", "kl", "+.4f"), ("entropy", "entropy", ".3f"),
                    ("ppo/clip_fraction", "clip", ".3f"), ("ppo/value_loss", "value loss", ".4f"),
                    ("ppo/explained_variance", "EV", "+.3f"), ("response_length", "length", ".2f"),
                    ("rollout/tokens_per_s", "rollout tok/s", ".0f"))

    @classmethod
    def iterations(cls, cfg: TrainConfig, data: DataSpec) -> int:
        """``--train-iters``, or ``--train-epochs`` over the prompt file."""
        if cfg.train_iters is not None:
            return cfg.train_iters
        from megatron_tgdpo.tasks.jsonl import read_jsonl

        lines, _ = read_jsonl(cfg.ppo.prompts)
        return max(1, math.ceil(cfg.train_epochs * len(lines) / cfg.global_batch_size))

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.ppo = ppo = self.section
        self.actor: Optional[CheckpointPart] = None
        self.critic: Optional[CheckpointPart] = None
        self.frozen: dict[str, list] = {}
        self.learned_rm: Optional[list] = None
        self.logprobs = LogprobSettings.of(self.cfg)
        self.scorer = SequenceScorer(ppo.sparse_reward_command)
        self.iteration = 0  # the last iteration trained (for the rollout-samples metric)
        self.last_rollout: Optional[ro.Rollout] = None
        # FLOPs per rollout token: sampling ~1 forward, scoring 3-4 forwards, each epoch 3 (actor) + 3 (critic)
        self.passes_per_token = 1.0 + (4.0 if ppo.dense else 3.0) + float(ppo.learned) + 6.0 * ppo.ppo_epochs
        if not ppo.learned:  # no reward model: no learned-reward column (it would read NaN every step)
            self.means = tuple(name for name in self.means if name != "reward/learned")
        # One optimizer step per mini-batch: the LR schedules run over all of them.
        self.optimizer_steps = ctx.train_iters * ppo.ppo_epochs * ppo.ppo_mini_batches

    # ---- models and data ---------------------------------------------------------------------
    def build(self) -> None:
        from megatron.core import parallel_state as ps

        cfg, ppo, arch = self.cfg, self.ppo, self.ctx.arch
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._load_prompts()
        problems = layout_problems(ppo, cfg, dp=self.dp_size)
        if problems:
            raise ConfigError(problems)
        seed = cfg.seed
        self.frozen["ref"] = setup.build_frozen(arch, cfg, ModelSource.of(cfg.ref_load, seed=seed))
        if ppo.dense:
            self.frozen["dpo"] = setup.build_frozen(arch, cfg, ModelSource.of(ppo.reward_model_load, seed=seed))
        if ppo.learned:
            if not is_reward_model_checkpoint(ppo.learned_reward_load):
                raise ConfigError(f"--learned-reward-load {ppo.learned_reward_load}: not a reward model checkpoint "
                                  "(train one with `megatron-tgdpo train --loss-type rm`)")
            self.learned_rm = build_reward_model(arch, cfg, load=ppo.learned_reward_load, seed=seed)
            for chunk in self.learned_rm:
                chunk.eval()
                chunk.requires_grad_(False)
        chunks = setup.build_chunks(arch, cfg)
        start = setup.policy_start(cfg)
        if start == ModelSource.of(cfg.ref_load, seed=seed):
            for dst, src in zip(chunks, self.frozen["ref"]):  # the actor starts as an exact copy of the reference
                dst.load_state_dict(src.state_dict())
        else:
            start.load_into(chunks)
        self.actor = setup.wrap_trained(cfg, chunks, train_iters=self.optimizer_steps)
        self.critic = build_critic(arch, cfg, load=self._critic_source(),
                                   lr=ppo.critic_lr if ppo.critic_lr is not None else cfg.lr,
                                   train_iters=self.optimizer_steps, head_init_std=ppo.value_head_init_std, seed=seed,
                                   normalise=(ppo.learned_reward_mean, ppo.learned_reward_std))

    def _critic_source(self) -> Optional[str]:
        """--critic-load, else the learned reward model (as RTO's official recipe), else --ref-load."""
        return self.ppo.critic_load or self.ppo.learned_reward_load or self.cfg.ref_load

    def _load_prompts(self) -> None:
        from megatron_tgdpo.data.manifest import read_manifest
        from megatron_tgdpo.data.tokenizer import load_tokenizer
        from megatron_tgdpo.generation.sampler import stop_ids

        cfg, ppo, data = self.cfg, self.ppo, self.ctx.data
        template = read_manifest(data.train_prefix).get("chat_template", {}).get("name")
        self.tokenizer = load_tokenizer(data.tokenizer, chat_template=template)
        self.eos_ids = stop_ids(self.tokenizer, model_dir=cfg.ref_load)  # the policy starts from --ref-load
        problems = []
        try:
            self.train_prompts = encode_prompt_file(ppo.prompts, self.tokenizer, what="--prompts")
            self.eval_prompts: Optional[PromptSet] = (encode_prompt_file(ppo.eval_prompts, self.tokenizer,
                                                                         what="--eval-prompts")
                                                      if ppo.eval_prompts else None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sets = [("--prompts", self.train_prompts)] + ([("--eval-prompts", self.eval_prompts)] if self.eval_prompts else [])
        for what, prompts in sets:
            problems.append(check_lengths(prompts, max_new_tokens=ppo.max_new_tokens, seq_length=cfg.seq_length,
                                          what=what))
        if ppo.sparse and not ppo.learned:
            problems.append(self.scorer.check(self.train_prompts.records, what="--prompts"))
        if self.eval_prompts is not None:
            problems.append(self.scorer.check(self.eval_prompts.records, what="--eval-prompts"))
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems)
        # Monitoring: the training prompts' score even when the reward does not use it.
        self.score_train = (ppo.sparse and not ppo.learned) or self.scorer.check(self.train_prompts.records,
                                                                                 what="") is None

    def parts(self) -> dict[str, CheckpointPart]:
        return {POLICY: self.actor, CRITIC: self.critic}

    def describe(self) -> str:
        ppo = self.ppo
        reward = {"dense-dpo": "dense DPO token reward", "sparse": "sparse sequence score",
                  "dense-dpo+sparse": "dense DPO token reward + sparse sequence score (RTO)"}[ppo.reward]
        if ppo.dense:
            reward += f" (dense clip {ppo.dense_reward_clip or 'off'})"
        if ppo.learned:
            reward += f", sequence score from the reward model {ppo.learned_reward_load}"
        return (f"ppo: {reward}, KL coef {ppo.kl_coef}, {ppo.ppo_loss_averaging}-averaged losses | "
                f"{self.cfg.global_batch_size} prompts x "
                f"{ppo.samples_per_prompt} samples per iteration, {ppo.ppo_epochs} epochs x {ppo.ppo_mini_batches} "
                f"mini-batches | frozen: {', '.join(self.frozen)} | critic from "
                f"{self._critic_source() or 'the seeded init'}")

    def _prompt_source(self, prompts: PromptSet, *, consumed_samples: int, held_out: bool) -> PromptSource:
        return PromptSource(prompts, global_batch_size=self.cfg.global_batch_size, dp_rank=self.dp_rank,
                            dp_size=self.dp_size, consumed_samples=consumed_samples, seed=self.cfg.seed,
                            held_out=held_out)

    def train_source(self, *, consumed_samples: int) -> PromptSource:
        """The prompt stream from ``consumed_samples`` (its position)."""
        return self._prompt_source(self.train_prompts, consumed_samples=consumed_samples, held_out=False)

    def eval_batches(self) -> Optional[Iterator[list[PromptBatch]]]:
        """``--eval-iters`` global batches of --eval-prompts in file order; None without --eval-prompts."""
        if self.eval_prompts is None or self.cfg.eval_iters <= 0:
            return None
        source = self._prompt_source(self.eval_prompts, consumed_samples=0, held_out=True)
        return (source.next_global_batch() for _ in range(self.cfg.eval_iters))

    # ---- one iteration -----------------------------------------------------------------------
    def _fixed_length(self) -> Optional[int]:
        return self.cfg.seq_length if self.cfg.pipeline_model_parallel_size > 1 else None

    def _device(self) -> torch.device:
        return setup.device()

    def train_step(self, batches: list[PromptBatch]) -> StepResult:
        (batch,) = batches
        cfg, ppo = self.cfg, self.ppo
        metrics = StepMetrics()
        device = self._device()

        t0 = time.monotonic()
        generated = ro.sample(self.actor.chunks, batch.token_ids, batch.keys, samples_per_prompt=ppo.samples_per_prompt,
                              temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens, eos_ids=self.eos_ids,
                              seed=cfg.seed, batch_size=ppo.generation_batch_size,
                              vocab_limit=self.tokenizer.vocab_size)
        rollout = ro.build(batch.iteration, generated, batch.token_ids, batch.records, batch.keys,
                           pad_id=self.ctx.data.pad_id, pad_to_multiple_of=cfg.pad_to_multiple_of,
                           fixed_length=self._fixed_length(), device=device)
        t1 = time.monotonic()
        new_tokens = sum(len(r) for r in rollout.responses)
        texts = [decode_response(r, f, self.tokenizer) for r, f in zip(rollout.responses, rollout.finish)]
        scores = (scores_on_last_stage(self.scorer, rollout.records, texts, device=device)
                  if self.score_train else None)
        models = {"old": self.actor.chunks, "ref": self.frozen["ref"]}
        if "dpo" in self.frozen:
            models["dpo"] = self.frozen["dpo"]
        ro.score(rollout, models, micro_batch_size=cfg.micro_batch_size, logprobs=self.logprobs,
                 values_fn=lambda micro: score_values(self.critic.chunks, micro))
        learned = None
        if self.learned_rm is not None:
            scored = score_sequences(self.learned_rm, rollout.micro_batches(range(len(rollout)), cfg.micro_batch_size))
            learned = torch.cat(scored, dim=0).double() if scored else None
        if rollout.tensors:  # the last pipeline stage
            adv.compute_advantages(rollout, ppo=ppo, beta=cfg.beta, scores=scores, metrics=metrics, learned=learned)
        t2 = time.monotonic()
        result = ppo_update(rollout, actor=self.actor, critic=self.critic, ppo=ppo, seed=cfg.seed,
                            micro_batch_size=cfg.micro_batch_size, logprobs=self.logprobs, metrics=metrics)
        t3 = time.monotonic()

        self.iteration = batch.iteration + 1
        self.last_rollout = rollout  # for inspection (tests, debugging); replaced every iteration
        one = torch.ones((), dtype=torch.float64, device=device)

        def value(x: float) -> torch.Tensor:
            return torch.tensor(float(x), dtype=torch.float64, device=device)

        samples = self.iteration * cfg.global_batch_size * ppo.samples_per_prompt
        metrics.add({"rollout/samples": (value(samples), one),
                     # each replica's tokens x DP over its seconds: the whole job's tokens/s
                     "rollout/tokens_per_s": (value(new_tokens * self.dp_size), value(max(t1 - t0, 1e-9))),
                     "time/rollout_s": (value(t1 - t0), one), "time/score_s": (value(t2 - t1), one),
                     "time/update_s": (value(t3 - t2), one)})
        # What the loop's throughput figures count: the rollout's rows (computed) and tokens (real); a
        # row attends over its whole width.
        rows, width = rollout.mask.shape
        return StepResult(metrics=metrics, grad_norm=result.grad_norm, updated=result.updated,
                          tokens=rows * width, attention_span=float(width) if rows * width else 0.0,
                          real_tokens=sum(len(p) + len(r) for p, r in zip(rollout.prompts, rollout.responses)))

    # ---- held-out ----------------------------------------------------------------------------
    def evaluate(self, batches: Iterator[list[PromptBatch]]) -> Optional[StepMetrics]:
        """Greedy responses to --eval-prompts, scored by the verifier (or --sparse-reward-command)."""
        from megatron_tgdpo.generation import SamplingConfig
        from megatron_tgdpo.generation.sampler import Sampler

        if self.eval_prompts is None:
            return None
        metrics = StepMetrics()
        device = self._device()
        for (batch,) in batches:
            if not len(batch):
                continue
            sampler = Sampler(chunks=self.actor.chunks, tokenizer=self.tokenizer, stop_ids=tuple(self.eos_ids))
            out = sampler.sample(batch.token_ids, sampling=SamplingConfig(temperature=0.0),
                                 max_new_tokens=self.ppo.max_new_tokens, seed=self.cfg.seed,
                                 micro_batch_size=self.ppo.generation_batch_size, prompt_keys=batch.keys)
            texts = [decode_response(g.tokens, g.finish_reason, self.tokenizer) for g in out]
            records = [batch.records[g.prompt_index] for g in out]
            scores = scores_on_last_stage(self.scorer, records, texts, device=device)
            if scores is None:
                continue
            n = torch.tensor(float(len(out)), dtype=torch.float64, device=device)
            exact = [e for e in self.scorer.exact(records, texts) if e is not None]
            sums = {"heldout/score": (scores.sum(), n),
                    "heldout/response_length": (torch.tensor(float(sum(len(g.tokens) for g in out)), device=device), n)}
            if exact:
                sums["heldout/exact_match"] = (torch.tensor(float(sum(exact)), device=device),
                                               torch.tensor(float(len(exact)), device=device))
            metrics.add(sums)
        return metrics

    def heldout_record(self, *, iteration: int, values: dict[str, float]) -> dict:
        """``heldout.jsonl``'s row: the iteration, the rollout samples used so far, the held-out values."""
        samples = iteration * self.cfg.global_batch_size * self.ppo.samples_per_prompt
        return {"iteration": iteration, "rollout_samples": samples,
                **{k.split("/", 1)[1]: v for k, v in values.items()}}
