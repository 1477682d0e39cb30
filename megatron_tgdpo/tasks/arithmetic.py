"""Multi-digit addition: ``"tot: 4 7 : 3 5 ="`` -> ``" 8 2"``.

The wording uses only characters the built-in tokenizer knows (digits, space, ``s o r t``, ``:``,
``=``): it has no ``+`` and no other letters, so "tot" (total) and ``:`` between the operands stand in
for "add" and ``+``. Digits are spaced like the sorting task's so each is one ``"▁d"`` token. Scoring is
aligned from the right (units with units), so a missed carry into a new leading digit still earns
the credit of the digits it got right.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from megatron_tgdpo.tasks.base import Task, spaced

__all__ = ["AdditionTask"]

MAX_DIGITS = 18  # far beyond what a tiny model learns; only guards against absurd flags


@dataclass(frozen=True)
class AdditionTask(Task):
    """Two operands drawn uniformly from ``[0, 10**num_digits)``, written without leading zeros.

    The default (2 digits, answers up to 3 digits) is learnable by a 4-layer, hidden-64 model on CPU
    in minutes; raise ``num_digits`` for harder prompts.
    """

    num_digits: int = 2

    name: ClassVar[str] = "addition"
    align: ClassVar[str] = "right"
    description: ClassVar[str] = "add two numbers: 'tot: 4 7 : 3 5 =' -> ' 8 2'"

    def __post_init__(self) -> None:
        if not 1 <= self.num_digits <= MAX_DIGITS:
            raise ValueError(f"addition: num_digits must be between 1 and {MAX_DIGITS}, got {self.num_digits}")

    @classmethod
    def canonical(cls, prompt: str) -> str:
        """Addition commutes: the operands in ascending order (``tot: 3 5 : 4 7 =`` for ``tot: 4 7 : 3 5 =``)."""
        if not (prompt.startswith("tot: ") and prompt.endswith(" =")):
            return prompt
        operands = prompt[len("tot: "):-len(" =")].split(" : ")
        if len(operands) != 2 or not all(o.replace(" ", "").isdigit() for o in operands):
            return prompt
        ordered = sorted(operands, key=lambda o: (int(o.replace(" ", "")), o))
        return f"tot: {ordered[0]} : {ordered[1]} ="

    def example(self, rng: random.Random) -> tuple[str, str]:
        a = rng.randrange(10**self.num_digits)
        b = rng.randrange(10**self.num_digits)
        return f"tot: {spaced(str(a))} : {spaced(str(b))} =", " " + spaced(str(a + b))
