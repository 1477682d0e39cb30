"""PPO's config section (``TrainConfig.ppo``; its flags and YAML keys come from the one builder in
:mod:`megatron_tgdpo.config`, the training flags — layout, optimiser, ``--ref-load``, ``--save`` … — are
the core :class:`~megatron_tgdpo.config.TrainConfig`'s), its validation, and what it means for the sizes.

Sizes: an iteration takes ``--global-batch-size`` prompts (G, all data-parallel ranks together) and
samples ``--samples-per-prompt`` responses (k) to each: a rollout of G*k sequences. It then runs
``--ppo-epochs`` passes over the rollout, each cut into ``--ppo-mini-batches`` mini-batches, and every
mini-batch is one optimizer step of the actor and one of the critic; ``--micro-batch-size`` is in
sequences (rows). So a data-parallel rank holds G/DP*k sequences, a mini-batch G/DP*k/M of them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_tgdpo import flag_checks
from megatron_tgdpo.config import TrainConfig

__all__ = ["DEFAULT_DENSE_REWARD_CLIP", "DEFAULT_KL_COEF", "NOT_FOR_PPO", "REWARDS", "PPOConfig", "problems"]

REWARDS = ("dense-dpo", "sparse", "dense-dpo+sparse")
LOSS_AVERAGING = ("token", "sequence")
#: RTO's official recipe (OpenRLHF-based code, its Llama-3-8B script): the dense token reward clipped to
#: +-0.05 per token and a KL coefficient of 0.01 (docs/rto.md)
DEFAULT_DENSE_REWARD_CLIP = 0.05
DEFAULT_KL_COEF = 0.01


@dataclass(frozen=True)
class PPOConfig:
    # --- prompts ------------------------------------------------------------------------------
    prompts: str = field(default="", metadata={"required": True, "help": "training prompt JSONL ({\"id\", \"prompt\", ...}; a task "
                                                         "file from `python -m megatron_tgdpo.tasks make-prompts`)"})
    eval_prompts: Optional[str] = field(default=None, metadata={
        "help": "held-out prompt JSONL: greedy responses scored by the verifier at --eval-interval (and before and "
                "after training); --eval-iters x --global-batch-size prompts at most"})
    # --- reward -------------------------------------------------------------------------------
    reward: str = field(default="dense-dpo+sparse", metadata={"help": " | ".join(REWARDS), "choices": REWARDS})
    reward_model_load: Optional[str] = field(default=None, metadata={
        "help": "the DPO-trained model whose implicit token reward --beta*(log pi_dpo - log pi_ref) is the dense "
                "reward (needed by dense-dpo)"})
    dense_reward_scale: float = field(default=1.0, metadata={"help": "multiplies the dense reward"})
    dense_reward_clip: float = field(default=DEFAULT_DENSE_REWARD_CLIP, metadata={
        "help": "clip each token's dense reward (after --dense-reward-scale and --beta) to [-c, c]; 0: no clip. "
                "Default: RTO's official value"})
    sparse_reward_scale: float = field(default=1.0, metadata={"help": "multiplies the sequence score"})
    sparse_reward_command: Optional[str] = field(default=None, metadata={
        "help": "score responses with this shell command instead of the prompt records' task verifier: it reads one "
                "JSON object per response on stdin ({\"id\", \"prompt\", \"response\", and the prompt record's other "
                "fields}) and writes one score per line (a number, or {\"score\": x}) on stdout"})
    learned_reward_load: Optional[str] = field(default=None, metadata={
        "help": "a Bradley-Terry reward model (a `train --loss-type rm` checkpoint): its score of each response, "
                "normalised and clipped, is the sparse reward in place of the verifier (which still reports "
                "`score`); the critic starts from it unless --critic-load is given"})
    learned_reward_mean: float = field(default=0.0, metadata={
        "help": "the learned score is normalised as (r - mean) / std (the reward model's held-out score_mean)"})
    learned_reward_std: float = field(default=1.0, metadata={"help": "see --learned-reward-mean (score_std)"})
    learned_reward_clip: float = field(default=10.0, metadata={
        "help": "clip the normalised learned score to [-c, c] (0: no clip); default as OpenRLHF, which RTO uses"})
    kl_coef: float = field(default=DEFAULT_KL_COEF, metadata={
        "help": "per-token KL penalty kl_coef*(log pi - log pi_ref); default: RTO's official 0.01"})
    # --- advantages and losses ----------------------------------------------------------------
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages over the whole rollout"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    value_clip_range: Optional[float] = field(default=0.2, metadata={
        "help": "value clip around the rollout's values (0: no clipping)"})
    ppo_loss_averaging: str = field(default="token", metadata={
        "help": "token: the policy and value losses are means over every response token of a mini-batch; "
                "sequence: means of each response's per-token mean (RTO's official code)",
        "choices": LOSS_AVERAGING})
    # --- schedule -----------------------------------------------------------------------------
    samples_per_prompt: int = 4
    ppo_epochs: int = 2
    ppo_mini_batches: int = 2
    # --- sampling -----------------------------------------------------------------------------
    max_new_tokens: int = 16
    temperature: float = field(default=1.0, metadata={
        "help": "rollout temperature; PPO's ratios use the policy at temperature 1, so keep 1 to stay on-policy"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences per generation forward"})
    # --- critic -------------------------------------------------------------------------------
    critic_load: Optional[str] = field(default=None, metadata={
        "help": "critic backbone (any --ref-load kind, or a PPO checkpoint: then its critic, value head included); "
                "default: --ref-load"})
    critic_lr: Optional[float] = field(default=None, metadata={"help": "critic learning rate; default: --lr"})
    value_head_init_std: float = field(default=0.0, metadata={"help": "0: a zero value head; else seeded normal"})

    @property
    def dense(self) -> bool:
        return self.reward in ("dense-dpo", "dense-dpo+sparse")

    @property
    def sparse(self) -> bool:
        return self.reward in ("sparse", "dense-dpo+sparse")

    @property
    def learned(self) -> bool:
        """The sparse reward is the learned reward model's score."""
        return self.learned_reward_load is not None

    @property
    def value_clip(self) -> Optional[float]:
        return self.value_clip_range if self.value_clip_range else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: training settings that mean nothing (or something else) for PPO, refused by name with the reason
NOT_FOR_PPO = {
    "loss_type": "--reward chooses the reward",
    "guidance_load": "TGDPO's guidance model",
    "logprob_cache": "rollouts are new every iteration; there is nothing to precompute",
    "pack_sequences": "rollouts are rows of one prompt and one response",
}


def _model_dir_problems(ppo: PPOConfig) -> list[str]:
    from megatron_tgdpo.runtime.path_checks import model_dir_problem

    lines = [model_dir_problem(_flag(name), getattr(ppo, name))
             for name in ("reward_model_load", "critic_load", "learned_reward_load")]
    return [line for line in lines if line]


def problems(ppo: PPOConfig, cfg: TrainConfig) -> list[str]:
    """Every problem with the PPO flags (and the training flags as PPO reads them), before any compute."""
    p = []
    if not ppo.prompts or not os.path.isfile(ppo.prompts):
        p.append(f"--prompts {ppo.prompts or '(missing)'}: no such file")
    if ppo.eval_prompts is not None and not os.path.isfile(ppo.eval_prompts):
        p.append(f"--eval-prompts {ppo.eval_prompts}: no such file")
    if ppo.dense and ppo.reward_model_load is None:
        p.append(f"--reward {ppo.reward} needs --reward-model-load (a DPO-trained checkpoint of the same architecture)")
    if not ppo.dense and ppo.reward_model_load is not None:
        p.append(f"--reward-model-load does not apply to --reward {ppo.reward}; use dense-dpo or dense-dpo+sparse")
    for name in ("reward_model_load", "critic_load", "learned_reward_load"):
        path = getattr(ppo, name)
        if path is not None and not os.path.exists(path):
            p.append(f"{_flag(name)} {path}: does not exist")
    if ppo.learned and not ppo.sparse:
        p.append(f"--learned-reward-load is the sparse reward; it does not apply to --reward {ppo.reward}")
    if ppo.learned and ppo.sparse_reward_command is not None:
        p.append("--learned-reward-load and --sparse-reward-command are two sparse rewards; give one")
    if ppo.learned and os.path.exists(ppo.learned_reward_load):
        from megatron_tgdpo.algorithms.reward_model import is_reward_model_checkpoint

        if not is_reward_model_checkpoint(ppo.learned_reward_load):
            p.append(f"--learned-reward-load {ppo.learned_reward_load}: not a reward model checkpoint (train one with "
                     "`megatron-tgdpo train --loss-type rm`)")
    if not ppo.learned_reward_std > 0:
        p.append(f"--learned-reward-std must be > 0, got {ppo.learned_reward_std}")
    if ppo.sparse_reward_command is not None and not ppo.sparse:
        p.append(f"--sparse-reward-command does not apply to --reward {ppo.reward}")
    for name, low in (("samples_per_prompt", 1), ("ppo_epochs", 1), ("ppo_mini_batches", 1), ("max_new_tokens", 1),
                      ("generation_batch_size", 1)):
        if getattr(ppo, name) < low:
            p.append(f"{_flag(name)} must be >= {low}, got {getattr(ppo, name)}")
    for name in ("kl_coef", "clip_range", "dense_reward_scale", "sparse_reward_scale", "value_head_init_std",
                 "dense_reward_clip", "learned_reward_clip"):
        if not getattr(ppo, name) >= 0:
            p.append(f"{_flag(name)} must be >= 0, got {getattr(ppo, name)}")
    if not ppo.clip_range > 0:
        p.append(f"--clip-range must be > 0, got {ppo.clip_range}")
    if ppo.value_clip_range is not None and not ppo.value_clip_range >= 0:
        p.append(f"--value-clip-range must be >= 0 (0: no clipping), got {ppo.value_clip_range}")
    for name in ("gamma", "lam"):
        if not 0.0 <= getattr(ppo, name) <= 1.0:
            p.append(f"{_flag(name)} must be in [0, 1], got {getattr(ppo, name)}")
    if not ppo.temperature > 0:
        p.append(f"--temperature must be > 0 (PPO samples; greedy rollouts have no exploration), got {ppo.temperature}")
    if ppo.critic_lr is not None and not ppo.critic_lr > 0:
        p.append(f"--critic-lr must be > 0, got {ppo.critic_lr}")
    if cfg.pack_sequences:
        p.append("--pack-sequences does not apply to PPO (rollouts are rows of one prompt and one response)")
    if cfg.context_parallel_size > 1:
        p.append(f"--context-parallel-size {cfg.context_parallel_size}: PPO samples its rollouts from the policy it "
                 "trains, and generation does not support context parallelism (a decode step has one token per "
                 "row); use --context-parallel-size 1 and spread the ranks over TP/PP/DP")
    if cfg.micro_batch_size >= 1 and cfg.global_batch_size >= 1 and ppo.samples_per_prompt >= 1 \
            and ppo.ppo_mini_batches >= 1:
        rows = cfg.global_batch_size * ppo.samples_per_prompt
        step = ppo.ppo_mini_batches * cfg.micro_batch_size
        if rows % step:
            p.append(f"a rollout of --global-batch-size {cfg.global_batch_size} x --samples-per-prompt "
                     f"{ppo.samples_per_prompt} = {rows} sequences does not split into --ppo-mini-batches "
                     f"{ppo.ppo_mini_batches} x --micro-batch-size {cfg.micro_batch_size} (per data-parallel rank)")
    # Then what the checks above let through (non-finite, huge), for flags they do not name already.
    return flag_checks.without_repeats(p + _model_dir_problems(ppo), flag_checks.config_problems(ppo))


def layout_problems(ppo: PPOConfig, cfg: TrainConfig, *, dp: int) -> list[str]:
    """Size problems that need the data-parallel size (known once the ranks exist)."""
    p = []
    if cfg.global_batch_size % dp:
        p.append(f"--global-batch-size {cfg.global_batch_size} prompts must be divisible by the data-parallel size {dp}")
        return p
    rows = cfg.global_batch_size // dp * ppo.samples_per_prompt
    if rows % (ppo.ppo_mini_batches * cfg.micro_batch_size):
        p.append(f"each data-parallel rank holds {rows} rollout sequences, which do not split into --ppo-mini-batches "
                 f"{ppo.ppo_mini_batches} x --micro-batch-size {cfg.micro_batch_size}")
    elif cfg.virtual_pipeline_model_parallel_size:
        micro = rows // (ppo.ppo_mini_batches * cfg.micro_batch_size)
        if micro % cfg.pipeline_model_parallel_size:
            p.append(f"with virtual pipeline stages a mini-batch's {micro} micro-batches must be a multiple of "
                     f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size}")
    return p
