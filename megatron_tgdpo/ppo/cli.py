"""``python -m megatron_tgdpo.ppo``: PPO with dense DPO token rewards (RTO) and/or a sparse sequence score.

    torchrun --nproc-per-node 2 -m megatron_tgdpo.ppo --prompts train_prompts.jsonl \\
        --eval-prompts heldout_prompts.jsonl --reward dense-dpo+sparse --reward-model-load runs/dpo \\
        --ref-load runs/sft --data-path runs/data/sft --global-batch-size 32 --samples-per-prompt 4 \\
        --micro-batch-size 16 --train-iters 100 --lr 1e-4 --save runs/rto --log-dir runs/rto/log

PPO's own flags (``--help`` lists them) plus every training flag of ``python -m megatron_tgdpo.train``:
the layout (TP/SP/PP/VPP/DP, ``--use-distributed-optimizer``; context parallelism is refused because
rollouts are sampled with the trained policy and generation has no CP), the optimiser (``--lr`` is the
actor's, ``--critic-lr`` the critic's), ``--ref-load`` (reference, and the actor's and by default the
critic's starting point), ``--beta`` (the beta the DPO reward model was trained with: the dense reward is
``beta * (log pi_dpo - log pi_ref)``), ``--data-path`` (used for its tokenizer and chat template only;
default: the built-in data set's), ``--save``/``--load``/``--save-interval``, ``--eval-interval``.
``--global-batch-size`` counts prompts per iteration, ``--micro-batch-size`` rollout sequences per
forward. Exit codes as the trainer's: 0 finished, 2 configuration error, 75 stopped on SIGTERM/SIGUSR1
or the time budget after saving (requeue), 1 anything else.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from megatron_tgdpo.algorithms.ppo import config as ppo_config
from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.config import ConfigError, TrainConfig, parse_args

__all__ = ["main", "parse", "run"]


def parse(argv: Optional[Sequence[str]] = None) -> tuple[PPOConfig, TrainConfig]:
    """PPO and training settings from the command line (``cfg.ppo`` is the PPO section, also returned
    first); ConfigError lists every problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv, sections={"ppo": PPOConfig}, method="PPO", refused=ppo_config.NOT_FOR_PPO,
                     prog="python -m megatron_tgdpo.ppo",
                     description="PPO with dense DPO token rewards (RTO) and/or a sparse sequence score, on "
                                 "megatron-core.")
    # Rollouts are rows: packing is refused by name above, so the training default does not apply.
    cfg = dataclasses.replace(cfg, pack_sequences=False)
    problems = ppo_config.problems(cfg.ppo, cfg)
    if problems:
        raise ConfigError(problems)
    return cfg.ppo, dataclasses.replace(cfg, loss_type="ppo")  # the method, recorded in checkpoints and summary.json


def run(ppo: PPOConfig, cfg: TrainConfig) -> int:
    """Train on every rank of an initialised process group; returns the exit code."""
    from megatron_tgdpo.algorithms.ppo.algorithm import PPOAlgorithm
    from megatron_tgdpo.runtime import loop

    return loop.run(dataclasses.replace(cfg, ppo=ppo), PPOAlgorithm)


def _scorer_errors() -> tuple[type[BaseException], ...]:
    from megatron_tgdpo.algorithms.ppo.rewards import ScorerError

    return (ScorerError,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo.runtime.entry import launch

    return launch(lambda: parse(argv), lambda parsed: run(*parsed), verbose=lambda parsed: parsed[1].verbose,
                  expected=_scorer_errors)
