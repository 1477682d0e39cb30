"""Word-list tasks for a real chat model: sort a list of common English words alphabetically, or reverse it.

    prompt: "Sort these words in alphabetical order: pear, lamp, cat, river, moon, apple."
    answer: " apple, cat, lamp, moon, pear, river"

Answers run to 10-40 tokens, long enough for token-level credit assignment to matter, and a small
instruct model gets them partly right, so its samples differ in score.

Scoring reads the response's words that belong to the task's vocabulary (:data:`WORDS`), in order,
and ignores everything else: a chat model's framing ("Sure! Here is the sorted list:"), numbering
and punctuation cost nothing, while a missing, repeated, misplaced or invented list word does. The
score is the longest common subsequence of those words and the answer's, divided by the longer of the
two lists: 1 for the right list in the right order, partial credit for a list that is nearly ordered,
and less for one padded with extra list words. Exact match: the response's list words are exactly the
answer's, in order. Neither depends on the task's parameters, so any record of the task is scored
from its answer alone.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from megatron_tgdpo.tasks.base import Task

__all__ = ["WORDS", "WordReverseTask", "WordSortTask", "lcs_length", "list_words", "lcs_score"]

# Concrete nouns a 100M-parameter chat model knows, none of them a word its framing uses
# ("here", "list", "order", "word", "sorted" are absent on purpose), all lowercase letters.
WORDS: tuple[str, ...] = (
    "apple", "banana", "bread", "bridge", "candle", "car", "cat", "chair", "cloud", "coffee",
    "cow", "desk", "dog", "door", "duck", "egg", "fish", "flower", "forest", "fox",
    "garden", "glass", "goat", "grape", "guitar", "hat", "horse", "house", "island", "jacket",
    "key", "kite", "lamp", "lemon", "lion", "milk", "moon", "mountain", "mouse", "ocean",
    "orange", "pencil", "piano", "pear", "pig", "pillow", "plate", "rabbit", "river", "rock",
    "sheep", "shoe", "snake", "spoon", "star", "sun", "table", "tiger", "tree", "truck",
    "violin", "wall", "whale", "window", "wolf", "zebra",
)
_VOCABULARY = frozenset(WORDS)
_TOKEN = re.compile(r"[a-z]+")
MAX_LENGTH = 20


def list_words(text: str) -> list[str]:
    """The vocabulary words of ``text`` in order (case-insensitive); every other token is ignored."""
    return [w for w in _TOKEN.findall(text.lower()) if w in _VOCABULARY]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len a * len b))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def lcs_score(got: list[str], expected: list[str]) -> float:
    """LCS length over the longer list, in [0, 1]; 1 for two empty lists."""
    width = max(len(got), len(expected))
    return 1.0 if width == 0 else lcs_length(got, expected) / width


@dataclass(frozen=True)
class _WordListTask(Task):
    """``min_length..max_length`` distinct words of :data:`WORDS`, in random order."""

    min_length: int = 6
    max_length: int = 10

    align: ClassVar[str] = "left"  # unused: the score is the LCS fraction (see the module docstring)
    instruction: ClassVar[str]

    def __post_init__(self) -> None:
        if not 2 <= self.min_length <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"{self.name}: need 2 <= min_length <= max_length <= {MAX_LENGTH}, "
                             f"got min_length={self.min_length}, max_length={self.max_length}")

    def transform(self, words: list[str]) -> list[str]:
        raise NotImplementedError

    def example(self, rng: random.Random) -> tuple[str, str]:
        length = self.min_length + rng.randrange(self.max_length - self.min_length + 1)
        words = rng.sample(WORDS, length)
        # The leading space: every task's answer is the text that follows its prompt (tasks/prompts.py).
        return f"{self.instruction}: {', '.join(words)}.", " " + ", ".join(self.transform(words))

    def check_answer(self, answer: str) -> str | None:
        words = answer.strip().split(", ")
        bad = next((w for w in words if w not in _VOCABULARY), None)
        if bad is not None:
            return f"{bad!r} is not a word of the task's list (answers are comma-separated words, e.g. 'cat, dog')"
        return None

    def score(self, text: str, answer: str) -> float:
        return lcs_score(list_words(text), list_words(answer))

    def exact_match(self, text: str, answer: str) -> bool:
        return list_words(text) == list_words(answer)


@dataclass(frozen=True)
class WordSortTask(_WordListTask):
    name: ClassVar[str] = "word-sort"
    instruction: ClassVar[str] = "Sort these words in alphabetical order"
    description: ClassVar[str] = "sort English words alphabetically: '... order: pear, cat, moon.' -> 'cat, moon, pear'"

    def transform(self, words: list[str]) -> list[str]:
        return sorted(words)


@dataclass(frozen=True)
class WordReverseTask(_WordListTask):
    name: ClassVar[str] = "word-reverse"
    instruction: ClassVar[str] = "Write these words in reverse order"
    description: ClassVar[str] = "reverse a list of English words: '... order: pear, cat, moon.' -> 'moon, cat, pear'"

    def transform(self, words: list[str]) -> list[str]:
        return words[::-1]
