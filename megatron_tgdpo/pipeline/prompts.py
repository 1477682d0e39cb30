"""The prompt files of a run and the SFT data made from them.

Three disjoint prompt sets of one task: ``sft`` (their ideal answers are the SFT data), ``pref`` (the SFT
model samples k responses for each: the on-policy pairs), both from the train side of the task's
fixed hash split, and ``heldout`` from its held-out side (``tasks/prompts.py``), on which every model
is scored. ``sft_noise`` replaces one digit of that fraction of the SFT answers with another digit:
an imperfect teacher, so the SFT model makes mistakes that sampling spreads and preferences can fix.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from megatron_tgdpo.tasks.jsonl import read_jsonl, write_jsonl_atomic
from megatron_tgdpo.tasks.prompts import make_prompts
from megatron_tgdpo.tasks.registry import get_task

__all__ = ["noisy_answer", "read_prompts", "write_prompt_files", "write_sft_data"]

HELDOUT_SEED_OFFSET = 100_003  # the held-out draw uses its own seed stream (the split already keeps them apart)


def write_prompt_files(*, task: str, task_params: dict[str, Any], sft: int, pref: int, heldout: int,
                       seed: int, out: dict[str, Path]) -> dict[str, int]:
    """Write ``out["sft"]``, ``out["pref"]``, ``out["heldout"]``; returns the count of each."""
    spec = get_task(task, **task_params)
    train = make_prompts(spec, num=sft + pref, seed=seed, split="train")
    held = make_prompts(spec, num=heldout, seed=seed + HELDOUT_SEED_OFFSET, split="heldout")
    parts = {"sft": train[:sft], "pref": train[sft:], "heldout": held}
    for name, records in parts.items():
        write_jsonl_atomic(out[name], records)
    return {name: len(records) for name, records in parts.items()}


def noisy_answer(answer: str, rng: random.Random) -> str:
    """``answer`` (space-separated digits) with one digit replaced by a different one."""
    items = answer.split()
    position = rng.randrange(len(items))
    items[position] = str((int(items[position]) + 1 + rng.randrange(9)) % 10)
    return " " + " ".join(items)


def write_sft_data(prompts: Path, out: Path, *, noise: float, seed: int) -> dict[str, int]:
    """SFT records ``{"prompt", "response"}`` (``megatron-tgdpo prepare --format sft``) from a prompt file:
    the ideal answer, or for a ``noise`` fraction of the records (drawn with ``seed``) a noisy one."""
    rng = random.Random(seed)
    records, noisy = [], 0
    for record in read_prompts(prompts):
        response = record["answer"]
        if rng.random() < noise:
            response, noisy = noisy_answer(response, rng), noisy + 1
        records.append({"prompt": record["prompt"], "response": response, "id": record["id"]})
    write_jsonl_atomic(out, records)
    return {"records": len(records), "noisy": noisy}


def read_prompts(path: Path) -> list[dict[str, Any]]:
    lines, problems = read_jsonl(path)
    if problems:
        raise ValueError(f"{path}: {len(problems)} unreadable lines, e.g. {problems[0]}")
    return [line.value for line in lines]
