"""What every verifiable task shares: the response format, its parser and positional scoring.

A response is the answer's items separated by spaces, each item one digit, with a leading space:
``" 2 4 7 9"``, exactly as the built-in synthetic sorting data writes its responses, so every answer
digit is the same ``"▁d"`` token of the built-in tokenizer. Parsing is deliberately simple and
unambiguous: take the text up to the first newline and split it on whitespace; each resulting item is
one answer position. Nothing is stripped or repaired, so trailing junk (``" 8 2 sort"``) costs credit,
which is what a verifier must do to a model that does not stop.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar, Literal

__all__ = ["Task", "exact_match", "parse_response", "positional_score", "spaced"]

Align = Literal["left", "right"]


def spaced(items: Any) -> str:
    """``"47"`` or ``[4, 7]`` -> ``"4 7"``: one answer position per token."""
    return " ".join(str(item) for item in items)


def parse_response(text: str) -> list[str]:
    """The answer positions of a sampled response: whitespace-separated items of its first line."""
    return text.split("\n", 1)[0].split()


def positional_score(got: list[str], expected: list[str], *, align: Align) -> float:
    """Fraction of positions right, over the longer of the two lists (so missing and extra items both
    cost credit). ``align="right"`` compares numbers by place value (units with units)."""
    width = max(len(got), len(expected))
    if width == 0:
        return 1.0
    if align == "right":
        got, expected = got[::-1], expected[::-1]
    hits = sum(g == e for g, e in zip(got, expected))
    return hits / width


def exact_match(text: str, answer: str) -> bool:
    """Whitespace-insensitive: the parsed positions equal the reference answer's."""
    return parse_response(text) == answer.split()


class Task(ABC):
    """A task with seeded prompts and an exact verifier. Subclasses are frozen dataclasses whose fields
    are the difficulty parameters; ``name`` is the registry key written into prompt files."""

    name: ClassVar[str]
    align: ClassVar[Align]
    description: ClassVar[str]

    @abstractmethod
    def example(self, rng: random.Random) -> tuple[str, str]:
        """One ``(prompt, answer)`` drawn with ``rng``; the answer is the ideal response text."""

    def params(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def canonical(cls, prompt: str) -> str:
        """The problem a prompt poses, written one way: prompts that are the same problem (``a + b`` and
        ``b + a``) share it, so the held-out split (``prompts.is_heldout``) keeps them on one side. The
        prompt itself unless a task says otherwise; a prompt the task cannot parse is its own form."""
        return prompt

    def check_answer(self, answer: str) -> str | None:
        """Why ``answer`` cannot be a reference answer of this task, or ``None`` when it can."""
        items = answer.split()
        if not items:
            return "empty answer"
        bad = next((item for item in items if not (len(item) == 1 and item.isdigit())), None)
        if bad is not None:
            return f"{bad!r} is not a single digit (answers are space-separated digits, e.g. ' 1 2 3')"
        return None

    def score(self, text: str, answer: str) -> float:
        """In [0, 1]: the fraction of answer positions right (see :func:`positional_score`)."""
        return positional_score(parse_response(text), answer.split(), align=self.align)

    def exact_match(self, text: str, answer: str) -> bool:
        return exact_match(text, answer)
