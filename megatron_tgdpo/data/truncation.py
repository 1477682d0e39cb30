"""The explicit length policy for pairs longer than ``--max-seq-length``.

Notation: ``L`` = max_seq_length, ``K`` = min_response_tokens, ``M`` = min_prompt_tokens, ``P`` = prompt
length, ``R`` = the longer response (chosen or rejected, EOS included). Each side of a pair is one
training row of ``P + len(response)`` tokens, so a pair fits when ``P + R <= L``.

1. A pair with a response shorter than ``K`` tokens is dropped (``short_response``), whatever else.
2. A pair that fits is kept unchanged.
3. ``drop``: a pair that does not fit is dropped (``too_long``).
4. ``truncate_prompt``: the prompt is cut from the left to ``P' = max(L - R, min(P, M))`` tokens (a
   leading BOS is kept and the cut made after it); then each response longer than ``L - P'`` is cut
   from the right to ``L - P'`` tokens, losing its EOS. So responses are cut only when a response
   alone is longer than ``L - min(P, M)``, and always keep at least ``L - M >= K`` tokens. A pair
   whose two responses become identical by the cut is dropped (``identical_after_truncation``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["LengthPolicy", "LengthOutcome", "apply_length_policy"]

Truncation = Literal["truncate_prompt", "drop"]


@dataclass(frozen=True, kw_only=True)
class LengthPolicy:
    max_seq_length: int
    truncation: Truncation = "truncate_prompt"
    min_response_tokens: int = 1
    min_prompt_tokens: int = 16

    def __post_init__(self) -> None:
        if self.truncation not in ("truncate_prompt", "drop"):
            raise ValueError(f"truncation must be 'truncate_prompt' or 'drop', got {self.truncation!r}")
        if self.min_response_tokens < 1:
            raise ValueError(f"min_response_tokens must be >= 1, got {self.min_response_tokens}")
        if self.min_prompt_tokens < 1:
            # The first response token is predicted from the last prompt token; without one it is never trained.
            raise ValueError(f"min_prompt_tokens must be >= 1, got {self.min_prompt_tokens}")
        if self.min_prompt_tokens + self.min_response_tokens > self.max_seq_length:
            raise ValueError(
                f"min_prompt_tokens ({self.min_prompt_tokens}) + min_response_tokens ({self.min_response_tokens}) "
                f"must not exceed max_seq_length ({self.max_seq_length}); lower --min-prompt-tokens"
            )


@dataclass(frozen=True, slots=True)
class LengthOutcome:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    dropped: str | None = None  # "too_long" | "short_response" | "identical_after_truncation" | None
    prompt_truncated: bool = False
    responses_truncated: int = 0  # 0, 1 or 2 sides cut from the right


def apply_length_policy(
    prompt: list[int], chosen: list[int], rejected: list[int], *, policy: LengthPolicy, bos_id: int | None
) -> LengthOutcome:
    if min(len(chosen), len(rejected)) < policy.min_response_tokens:
        return LengthOutcome(prompt, chosen, rejected, dropped="short_response")
    limit = policy.max_seq_length
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= limit:
        return LengthOutcome(prompt, chosen, rejected)
    if policy.truncation == "drop":
        return LengthOutcome(prompt, chosen, rejected, dropped="too_long")

    keep = max(limit - longest, min(len(prompt), policy.min_prompt_tokens))
    prompt_truncated = keep < len(prompt)
    if prompt_truncated:
        if bos_id is not None and prompt[0] == bos_id and keep >= 1:
            prompt = [bos_id, *prompt[len(prompt) - keep + 1 :]] if keep > 1 else [bos_id]
        else:
            prompt = prompt[len(prompt) - keep :]
    budget = limit - len(prompt)
    cut = 0
    if len(chosen) > budget:
        chosen, cut = chosen[:budget], cut + 1
    if len(rejected) > budget:
        rejected, cut = rejected[:budget], cut + 1
    if cut and chosen == rejected:
        # The responses differed only past the cut: no preference signal is left.
        return LengthOutcome(prompt, chosen, rejected, dropped="identical_after_truncation")
    return LengthOutcome(prompt, chosen, rejected, prompt_truncated=prompt_truncated, responses_truncated=cut)
