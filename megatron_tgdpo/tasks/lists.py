"""Digit-list tasks: sorting (``"sort: 7 2 9 4 ="`` -> ``" 2 4 7 9"``, the built-in data set's task, so a
model trained on it starts with some skill) and reversal (``"tros: 7 2 9 4 ="`` -> ``" 4 9 2 7"``;
"tros" is "sort" backwards, spelled with the only letters the built-in tokenizer has).

Both are scored from the left: position i of the response against position i of the answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from megatron_tgdpo.tasks.base import Task, spaced

__all__ = ["ReverseTask", "SortTask"]

MAX_LENGTH = 64


@dataclass(frozen=True)
class _DigitListTask(Task):
    """A list of ``min_length..max_length`` random digits (repeats allowed). The defaults (4..8) are
    the built-in data set's lengths."""

    min_length: int = 4
    max_length: int = 8

    align: ClassVar[str] = "left"
    tag: ClassVar[str]

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length <= MAX_LENGTH:
            raise ValueError(
                f"{self.name}: need 1 <= min_length <= max_length <= {MAX_LENGTH}, "
                f"got min_length={self.min_length}, max_length={self.max_length}"
            )

    def transform(self, digits: list[int]) -> list[int]:
        raise NotImplementedError

    def example(self, rng: random.Random) -> tuple[str, str]:
        length = self.min_length + rng.randrange(self.max_length - self.min_length + 1)
        digits = [rng.randrange(10) for _ in range(length)]
        return f"{self.tag}: {spaced(digits)} =", " " + spaced(self.transform(digits))


@dataclass(frozen=True)
class SortTask(_DigitListTask):
    name: ClassVar[str] = "sort"
    tag: ClassVar[str] = "sort"
    description: ClassVar[str] = "sort digits ascending: 'sort: 7 2 9 4 =' -> ' 2 4 7 9'"

    def transform(self, digits: list[int]) -> list[int]:
        return sorted(digits)

    @classmethod
    def canonical(cls, prompt: str) -> str:
        """Sorting sees only the multiset of the digits: the prompt with its digits sorted (every order of
        one multiset is the same problem with the same answer)."""
        head, sep, rest = prompt.partition(": ")
        if head != cls.tag or not sep or not rest.endswith(" ="):
            return prompt
        items = rest[:-len(" =")].split()
        return f"{cls.tag}: {' '.join(sorted(items))} ="


@dataclass(frozen=True)
class ReverseTask(_DigitListTask):
    name: ClassVar[str] = "reverse"
    tag: ClassVar[str] = "tros"
    description: ClassVar[str] = "reverse digits: 'tros: 7 2 9 4 =' -> ' 4 9 2 7'"

    def transform(self, digits: list[int]) -> list[int]:
        return digits[::-1]
