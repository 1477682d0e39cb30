"""The prompt stream: which prompts iteration ``i`` samples, resumable from the loop's consumed count.

Training prompts form an endless stream: position ``p`` is prompt ``perm_e[p mod N]`` of the prompt file,
``e = p // N`` (one seeded permutation per pass over the file). Iteration ``i`` takes positions
``[i*G, (i+1)*G)``; data-parallel rank ``r`` of ``D`` takes every ``D``-th of them starting at ``r``. The
stream position is the loop's consumed-samples count (saved in every checkpoint), so a resumed run
continues exactly where it stopped, and each prompt's *position* is the key its samples are drawn
with (``generation`` keys randomness by (seed, prompt key, sample, step)): the same prompt met again
later gets fresh samples, and a rollout is the same at any layout or data-parallel size.

Held-out prompts are read in file order, ``G`` per global batch, without wrapping.

A :class:`PromptBatch` is what the Trainer hands to ``train_step`` / ``evaluate``: input only (the
step reports the rollout's token counts in its ``StepResult``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = ["PromptBatch", "PromptSet", "PromptSource"]


@dataclass(frozen=True)
class PromptSet:
    """A prompt file, encoded: one entry per prompt, in file order."""

    records: tuple[dict[str, Any], ...]  # the JSON objects as read ("id", "prompt", "task", "answer", ...)
    token_ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class PromptBatch:
    """This data-parallel rank's prompts of one global batch (the loop's "micro-batch list" has one)."""

    indices: list[int]  # into the PromptSet
    keys: list[int]  # stream positions (training) or file indices (held-out): the sampling keys
    iteration: int  # the training iteration this batch is for (held-out: -1)
    prompt_set: PromptSet = field(repr=False)

    @property
    def token_ids(self) -> list[list[int]]:
        return [list(self.prompt_set.token_ids[i]) for i in self.indices]

    @property
    def records(self) -> list[dict[str, Any]]:
        return [self.prompt_set.records[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)


def _permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, 0x9E0, int(epoch)])).permutation(n)


class PromptSource:
    """``next_global_batch()`` -> ``[PromptBatch]`` for this data-parallel rank (see the module docstring)."""

    def __init__(self, prompts: PromptSet, *, global_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, seed: int, held_out: bool):
        if len(prompts) == 0:
            raise ValueError("no prompts")
        self.prompts = prompts
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.position = consumed_samples
        self.seed = seed
        self.held_out = held_out
        self._perms: dict[int, np.ndarray] = {}

    def prompt_at(self, position: int) -> int:
        """The prompt-file index at stream ``position`` (training)."""
        n = len(self.prompts)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: _permutation(n, seed=self.seed, epoch=epoch)}
        return int(self._perms[epoch][position % n])

    def positions(self, start: int) -> list[int]:
        mine = range(start + self.dp_rank, start + self.global_batch_size, self.dp_size)
        if self.held_out:
            return [p for p in mine if p < len(self.prompts)]
        return list(mine)

    def next_global_batch(self) -> list[PromptBatch]:
        start = self.position
        self.position += self.global_batch_size
        mine = self.positions(start)
        if self.held_out:
            indices = mine
            iteration = -1
        else:
            indices = [self.prompt_at(p) for p in mine]
            iteration = start // self.global_batch_size
        return [PromptBatch(indices=indices, keys=list(mine), iteration=iteration, prompt_set=self.prompts)]


def encode_prompt_file(path: str, tokenizer, *, what: str) -> PromptSet:
    """Read and encode a prompt file the way generation and the data tool render prompts. Raises
    ``ValueError`` with every bad line."""
    from megatron_tgdpo.data.templates import TemplateRenderError
    from megatron_tgdpo.generation.prompts import encode_prompt, read_prompt_file
    from megatron_tgdpo.tasks.jsonl import BadLinesError

    try:
        records = read_prompt_file(path)
    except (BadLinesError, FileNotFoundError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from None
    ids: list[tuple[int, ...]] = []
    bad: list[str] = []
    for record in records:
        try:
            ids.append(tuple(encode_prompt(record.messages, tokenizer)))
        except TemplateRenderError as exc:
            bad.append(f"{path}:{record.line}: prompt: {exc.reason}")
    if bad:
        raise ValueError(f"{what} {path}: " + "; ".join(bad[:10]))
    return PromptSet(records=tuple(r.fields for r in records), token_ids=tuple(ids))


def check_lengths(prompts: PromptSet, *, max_new_tokens: int, seq_length: int, what: str) -> Optional[str]:
    """Why some prompt + ``max_new_tokens`` does not fit ``--seq-length`` (None when all fit)."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts.token_ids[i]))
    n = len(prompts.token_ids[longest])
    if n + max_new_tokens > seq_length:
        return (f"{what}: the longest prompt (id {prompts.records[longest].get('id')!r}) has {n} tokens; with "
                f"--max-new-tokens {max_new_tokens} a rollout needs {n + max_new_tokens} > --seq-length {seq_length} "
                "positions; raise --seq-length or lower --max-new-tokens")
    return None
