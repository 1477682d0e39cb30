"""What generation is asked to do (:class:`SamplingConfig`) and what it returns (:class:`GeneratedSequence`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

FinishReason = Literal["eos", "length"]


class GenerationError(ValueError):
    """A generation request that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn.

    ``temperature`` 0 is greedy (argmax; ``top_p``/``top_k`` are then irrelevant). Otherwise logits are
    divided by the temperature, cut to the ``top_k`` most likely tokens (0 = no cut), then to the
    smallest set whose probability reaches ``top_p`` (1.0 = no cut), renormalised, and sampled.
    ``num_samples`` sequences are drawn per prompt. ``return_logprobs`` adds each sampled token's
    log-probability under the model (temperature 1, full vocabulary, before any cut), the quantity the
    trainer's scorer computes, so PPO can use it as the behaviour policy's log-prob.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    return_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self) -> list[str]:
        """Every invalid setting, each naming the CLI flag (empty when valid)."""
        out = []
        if not self.temperature >= 0.0:  # also catches NaN
            out.append(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"--top-p {self.top_p}: must be in (0, 1] (1 = no nucleus cut)")
        if self.top_k < 0:
            out.append(f"--top-k {self.top_k}: must be >= 0 (0 = no top-k cut)")
        if self.num_samples < 1:
            out.append(f"--num-samples {self.num_samples}: must be >= 1")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise GenerationError("invalid sampling settings: " + "; ".join(problems))


@dataclass(frozen=True)
class GeneratedSequence:
    """One sampled continuation of one prompt.

    ``tokens`` are the generated ids only (not the prompt); with ``finish_reason == "eos"`` the last one
    is the stop id that ended it. ``logprobs`` (one per token) only when asked for.
    """

    prompt_index: int  # position of the prompt in the list given to ``generate``
    sample_index: int  # 0 .. num_samples-1
    tokens: list[int]
    finish_reason: FinishReason
    logprobs: Optional[list[float]] = None
