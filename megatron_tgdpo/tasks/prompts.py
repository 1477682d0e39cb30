"""Prompt files: ``n`` distinct prompts of a task from a seed, optionally restricted to one side of a
fixed train / held-out split.

Prompt file format (JSONL, one object per line)::

    {"id": "addition-3f9c0a1b2d4e", "prompt": "tot: 4 7 : 3 5 =", "task": "addition", "answer": " 8 2"}

``answer`` is the ideal response text (leading space included), so ``prompt + answer`` is also an SFT
example. ``id`` is derived from the task and the prompt text, so the same prompt has the same id in
every file and ids are unique within a file (prompts are distinct).

The split does not depend on the seed: a prompt is held out iff a hash of ``(split_seed, task,
canonical form)`` falls below ``heldout_fraction``, the canonical form being the problem the prompt poses
written one way (``Task.canonical``: addition's ``a + b`` and ``b + a`` are one problem; sorting's input is
a multiset). Files made with ``split="train"`` and ``split="heldout"`` (same ``split_seed`` and fraction)
are therefore disjoint whatever their seeds, sizes or difficulty, and so are the problems they pose: no
held-out prompt is a reordering of a training prompt. ``split_by="prompt"`` hashes the prompt text
instead (the split before canonical forms: addition and sorting then leak reordered problems).
"""
from __future__ import annotations

import hashlib
import random
from typing import Literal

from megatron_tgdpo.tasks.base import Task

__all__ = ["SPLITS", "SPLIT_BY", "canonical_prompt", "is_heldout", "make_prompts", "prompt_id"]

Split = Literal["all", "train", "heldout"]
SPLITS: tuple[str, ...] = ("all", "train", "heldout")
SplitBy = Literal["canonical", "prompt"]
SPLIT_BY: tuple[str, ...] = ("canonical", "prompt")

# Draws in a row that yield nothing new before we conclude the (split of the) prompt space is used up.
MAX_MISSES = 20_000


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).digest()


def prompt_id(task: str, prompt: str) -> str:
    return f"{task}-{_digest(task, prompt)[:6].hex()}"


def canonical_prompt(task: str, prompt: str) -> str:
    """``prompt``'s canonical form under the task named ``task`` (itself for a task not registered)."""
    from megatron_tgdpo.tasks.registry import TASKS

    cls = TASKS.get(task)
    return prompt if cls is None else cls.canonical(prompt)


def is_heldout(prompt: str, *, task: str, split_seed: int, heldout_fraction: float,
               split_by: SplitBy = "canonical") -> bool:
    key = canonical_prompt(task, prompt) if split_by == "canonical" else prompt
    value = int.from_bytes(_digest("split", str(split_seed), task, key)[:8], "big") / 2**64
    return value < heldout_fraction


def make_prompts(
    task: Task,
    *,
    num: int,
    seed: int,
    split: Split = "all",
    heldout_fraction: float = 0.1,
    split_seed: int = 0,
    split_by: SplitBy = "canonical",
) -> list[dict[str, str]]:
    """``num`` records with distinct prompts, in draw order; the same arguments give the same list
    (``random.Random``'s output for a seed is stable across Python versions)."""
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    if split != "all" and not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    misses = 0
    while len(records) < num:
        prompt, answer = task.example(rng)
        fresh = prompt not in seen
        seen.add(prompt)
        wanted = split == "all" or (
            is_heldout(prompt, task=task.name, split_seed=split_seed, heldout_fraction=heldout_fraction,
                       split_by=split_by)
            == (split == "heldout")
        )
        if not (fresh and wanted):
            misses += 1
            if misses >= MAX_MISSES:
                raise ValueError(
                    f"{task.name} {task.params()}: found only {len(records)} distinct prompts"
                    f"{'' if split == 'all' else f' in the {split} split'} after {MAX_MISSES} draws in a row gave "
                    f"nothing new; ask for fewer (--num) or make the task larger (--num-digits / --max-length)"
                )
            continue
        misses = 0
        records.append({"id": prompt_id(task.name, prompt), "prompt": prompt, "task": task.name, "answer": answer})
    return records
