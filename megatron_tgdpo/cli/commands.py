"""The command table: name, the module that runs it, and its one-line summary (shown by ``--help``).

A row's module has ``main(argv: list[str], *, prog: str) -> int``; it is imported only when its command
runs. Keep the summaries to one line: the top-level help prints them in a column.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "find"]


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str
    #: a trainer: SIGTERM/SIGUSR1 from the first statement on only ask it to save and exit 75
    #: (runtime.signals.install_stop_handler, installed before the command's module is imported)
    saves_on_stop: bool = False


COMMANDS: tuple[Command, ...] = (
    # the method end to end
    Command("demo", "megatron_tgdpo.cli.demo", "SFT -> on-policy pairs -> DPO -> TGDPO -> held-out scores, ~2 CPU-minutes"),
    Command("replicate", "megatron_tgdpo.cli.replicate", "the full comparison (SFT, DPO, TGDPO, SimPO, IPO), seeds and alphas"),
    # training
    Command("train", "megatron_tgdpo.cli.train", "DPO / TGDPO / IPO / SimPO / SFT training (torchrun -m megatron_tgdpo train)",
            saves_on_stop=True),
    Command("ppo", "megatron_tgdpo.cli.ppo", "PPO with DPO's dense token reward (RTO) and/or a sparse score",
            saves_on_stop=True),
    Command("precompute", "megatron_tgdpo.cli.precompute", "the frozen models' log-probs once, for --logprob-cache"),
    # data
    Command("prepare", "megatron_tgdpo.cli.prepare", "JSONL pairs or SFT records -> indexed .bin/.idx + manifest"),
    Command("make-prompts", "megatron_tgdpo.cli.make_prompts", "a prompt file of a verifiable task (addition, sort, reverse)"),
    Command("generate", "megatron_tgdpo.cli.generate", "sample responses to a prompt file from a checkpoint"),
    Command("score", "megatron_tgdpo.cli.score", "add the task verifier's score to every sample"),
    Command("pairs", "megatron_tgdpo.cli.pairs", "on-policy preference pairs from scored samples (best vs worst)"),
    Command("evaluate", "megatron_tgdpo.cli.evaluate", "summarise scored samples; head-to-head against a second model"),
    Command("synthetic-data", "megatron_tgdpo.cli.synthetic_data", "regenerate the built-in synthetic data set and tokenizer"),
    # models and runs
    Command("convert", "megatron_tgdpo.cli.convert", "Llama checkpoints between Hugging Face and megatron_tgdpo"),
    Command("estimate-memory", "megatron_tgdpo.cli.estimate_memory", "per-GPU memory of a training job before you queue it"),
    Command("fetch-model", "megatron_tgdpo.cli.fetch_model",
            "a real model (SmolLM2-135M-Instruct) into the user cache: .gguf + fp32 Hugging Face directory"),
    Command("plot", "megatron_tgdpo.cli.plot", "training curves from metrics.jsonl files (needs matplotlib)"),
)


def find(name: str) -> Command | None:
    return next((command for command in COMMANDS if command.name == name), None)
