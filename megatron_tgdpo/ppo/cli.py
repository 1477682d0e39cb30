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
import math
import sys
from typing import Optional, Sequence


from megatron_tgdpo.algorithms.ppo import config as ppo_config
from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.config import ConfigError, TrainConfig, parse_tool_args

__all__ = ["main", "parse", "run"]


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse(argv: Optional[Sequence[str]] = None) -> tuple[PPOConfig, TrainConfig]:
    """PPO and training settings from the command line; ConfigError lists every problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_tool_args(ppo_config.build_parser(), argv, applies="all but --loss-type, --guidance-load, "
                                "--logprob-cache, --pack-sequences, --alpha and the TGDPO weight clamps")
    ppo = ppo_config.from_namespace(args)
    problems = ppo_config.problems(ppo, cfg)
    if _given(argv, "--loss-type"):
        problems.append("--loss-type does not apply to PPO (--reward chooses the reward)")
    if problems:
        raise ConfigError(problems)
    return ppo, training_config(ppo, cfg)


def training_config(ppo: PPOConfig, cfg: TrainConfig) -> TrainConfig:
    """The training configuration as the shared loop should read it for a PPO run."""
    changes: dict = {"loss_type": "ppo"}  # recorded in checkpoints and summary.json
    if cfg.train_iters is None and cfg.train_epochs is not None:  # epochs over the prompt file
        from megatron_tgdpo.tasks.jsonl import read_jsonl

        lines, _ = read_jsonl(ppo.prompts)
        changes.update(train_iters=max(1, math.ceil(cfg.train_epochs * len(lines) / cfg.global_batch_size)),
                       train_epochs=None)
    if ppo.eval_prompts is None:
        changes["eval_iters"] = 0
    elif cfg.data_path is not None and cfg.eval_data_path is None:
        # The loop evaluates when it knows an evaluation data prefix; PPO's held-out set is --eval-prompts,
        # so any prefix will do (the built-in data set has one).
        changes["eval_data_path"] = cfg.data_path
    return dataclasses.replace(cfg, **changes)


def run(ppo: PPOConfig, cfg: TrainConfig) -> int:
    """Train on every rank of an initialised process group; returns the exit code."""
    from megatron_tgdpo.algorithms.ppo.algorithm import ppo_algorithm
    from megatron_tgdpo.runtime import loop

    return loop.run(cfg, ppo_algorithm(ppo))


def _scorer_errors() -> tuple[type[BaseException], ...]:
    from megatron_tgdpo.algorithms.ppo.rewards import ScorerError

    return (ScorerError,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo.runtime.entry import launch

    return launch(lambda: parse(argv), lambda parsed: run(*parsed), verbose=lambda parsed: parsed[1].verbose,
                  expected=_scorer_errors)
