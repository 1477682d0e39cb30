"""Packed preference pairs: several pairs share one row, no padding between them beyond what CP needs.

Two steps, both deterministic:

1. :func:`plan_packing` assigns the pairs of one data-parallel rank's share of a global batch (in the
   shuffled stream order) to bins of ``capacity`` tokens, first-fit-decreasing by pair size (ties by
   stream position). ``capacity = 2 x micro_batch_size x seq_length`` (:func:`capacity_for`): a packed
   micro-batch never computes more tokens than the padded path at the same flags. A pair is two
   sequences (prompt + chosen, prompt + rejected), each padded to a multiple of ``2 x CP`` (context
   parallelism cuts every sequence into 2*CP chunks), and both always land in the same bin.
2. :class:`PackedPreferenceCollator` turns one bin into a packed :class:`~megatron_tgdpo.data.batch.Batch`
   (one row; see batch.py for the contract), and :func:`packed_seq_params_for` gives megatron-core's
   ``PackedSeqParams`` for it, which the model call needs: megatron's RoPE restarts per segment and the
   attention stays inside one only when they are passed (``position_ids`` are *not* what RoPE reads).

Row layout of a bin with pairs ``0..P-1`` (stream order): chosen sequences of pairs ``0..P-1``, then
their rejected sequences, then (with ``fixed_length``, or to reach ``pad_to_multiple_of``) one tail
segment of padding. Every segment is one ``cu_seqlens`` entry: the padded boundaries, the same in
``cu_seqlens_q`` and ``cu_seqlens_q_padded`` (a sequence's own padding follows its tokens, so causally
no real token sees it; see models/layers.py).

**Shared prompts** (``share_prompt``): a pair's prompt is computed once. Per pair, in stream order: its
prompt without the last token (one segment, not padded), then the prompt's last token followed by the
chosen response, then the prompt's last token followed by the rejected response (each padded like any
sequence). Under context parallelism the prompt segment holds a multiple of ``2 x CP`` tokens and the
few prompt tokens left over start each response segment (:func:`shared_prompt_split`). The last
prompt token is repeated because its logits predict the response's first token, and each response has
its own first token: with it at the start of each response segment every position still predicts
exactly one label, so the vocab-parallel log-prob op,
``labels``/``loss_mask``/``sequence_ids`` and the ``[chosen; rejected]`` sequence numbering are those of
the unshared row. ``position_ids`` continue the prompt's (the response segments start at the position
the repeated token has in the prompt). ``Batch.prefix_of`` names, per segment, the prompt segment its
queries also attend to; the attention gives a response segment the prompt's keys plus its own,
causally (models/layers.py); RoPE takes ``position_ids`` instead of restarting per segment. The prompt
segment's ``sequence_ids`` are -1 (it carries no loss). A prompt of one token is not split (nothing
to share); an empty prompt leaves the responses as they are.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_tgdpo.data.batch import Batch

__all__ = [
    "PAIR_SIDES",
    "PackedPreferenceCollator",
    "PackingPlan",
    "capacity_for",
    "packed_seq_params_for",
    "padded_length",
    "plan_packing",
    "shared_prompt_split",
    "shared_row_positions",
]


def capacity_for(*, micro_batch_size: int, seq_length: int) -> int:
    """Tokens of one packed micro-batch: what the padded path computes (2 rows per pair)."""
    return 2 * micro_batch_size * seq_length


def padded_length(length: int, *, context_parallel_size: int) -> int:
    """A sequence's segment length: the next multiple of ``2 x CP`` (an empty sequence still gets one
    chunk, so no segment is empty: TE and the CP split both need every segment non-empty)."""
    multiple = 2 * context_parallel_size
    return max(1, -(-length // multiple)) * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _row_length(content: int, *, fixed_length: Optional[int], multiple: int) -> int:
    """Tokens of a row whose segments hold ``content`` tokens: ``fixed_length`` (pipeline parallelism
    needs one shape for every micro-batch) or the content rounded up to ``multiple``."""
    return fixed_length if fixed_length is not None else max(_round_up(content, multiple), multiple)


@dataclass(frozen=True)
class PackingPlan:
    """Bins of pair positions (indices into the packed window, ascending within a bin) plus what they
    cost. ``real_tokens``: prompt + response tokens of every sequence; ``padded_tokens``: the segments
    (each sequence padded to 2*CP); ``computed_tokens``: the rows the model runs (tail padding too)."""

    bins: tuple[tuple[int, ...], ...]
    capacity: int
    real_tokens: int
    padded_tokens: int
    computed_tokens: int
    #: every row's length when the plan fixes one for all its rows (``uniform_rows``), else None
    row_length: Optional[int] = None
    #: empty micro-batches appended so the count is a multiple of ``bin_multiple`` (counted in computed_tokens)
    padding_bins: int = 0

    @property
    def num_bins(self) -> int:
        return len(self.bins)

    @property
    def efficiency(self) -> float:
        """Fraction of computed token positions that hold real tokens."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def _as_lengths(pair_lengths: Any) -> np.ndarray:
    """``[P, 3]`` int64 (prompt, chosen, rejected) lengths."""
    lengths = np.asarray(pair_lengths, dtype=np.int64)
    if lengths.size == 0:
        return lengths.reshape(0, 3)
    if lengths.ndim != 2 or lengths.shape[1] != 3:
        raise ValueError(f"pair lengths must be (prompt, chosen, rejected) per pair, got shape {lengths.shape}")
    if (lengths < 0).any():
        raise ValueError("pair lengths must be >= 0")
    return lengths


PAIR_SIDES = ("chosen", "rejected")


def shared_prompt_split(prompt_length: int, *, context_parallel_size: int = 1) -> tuple[int, int]:
    """(tokens of the shared prompt segment, prompt tokens repeated at the start of each response
    segment) in the shared-prompt layout: the prompt's last token starts every response segment (its
    logits predict the response's first token), the rest is computed once.

    Under context parallelism every segment is cut into ``2 x CP`` chunks, so the shared segment holds
    the largest multiple of ``2 x CP`` prompt tokens before the last one, and the up to ``2 x CP - 1``
    tokens left over start each response segment too. The shared segment is never padded: both
    responses attend to all of its keys, and a padding key would change their attention."""
    multiple = 1 if context_parallel_size == 1 else 2 * context_parallel_size
    shared = (max(prompt_length - 1, 0) // multiple) * multiple
    return shared, prompt_length - shared


def _pair_sizes(lengths: np.ndarray, *, context_parallel_size: int, sides: Sequence[str] = PAIR_SIDES,
                share_prompt: bool = False) -> list[int]:
    """Tokens each item takes in a bin: its sequences (prompt + each side's response), each padded;
    with ``share_prompt`` the prompt once plus each response after the prompt's last token."""
    columns = [1 + PAIR_SIDES.index(side) for side in sides]
    if share_prompt:
        sizes = []
        for row in lengths:
            shared, keep = shared_prompt_split(int(row[0]), context_parallel_size=context_parallel_size)
            sizes.append(shared + sum(padded_length(keep + int(row[c]), context_parallel_size=context_parallel_size)
                                      for c in columns))
        return sizes
    return [sum(padded_length(int(row[0] + row[c]), context_parallel_size=context_parallel_size) for c in columns)
            for row in lengths]


def _first_fit_decreasing(sizes: list[int], *, capacity: int) -> list[list[int]]:
    """Largest pair first (ties: earlier stream position first), each into the first bin with room."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        target = next((b for b, room in enumerate(free) if room >= sizes[i]), None)
        if target is None:
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(i)
        free[target] -= sizes[i]
    return [sorted(b) for b in bins]


def _balanced(sizes: list[int], *, count: int, capacity: int) -> Optional[list[list[int]]]:
    """``count`` bins filled largest pair first into the emptiest bin (ties: the lower bin), so the
    fullest bin, which sets a uniform row's length, stays near the mean; None when one would pass
    ``capacity``. Empty bins are dropped (fewer pairs than bins)."""
    heap = [(0, b) for b in range(count)]  # (load, bin): the emptiest, then the lowest bin, on top
    bins: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, target = heapq.heappop(heap)
        if load + sizes[i] > capacity:
            return None
        bins[target].append(i)
        heapq.heappush(heap, (load + sizes[i], target))
    return [sorted(b) for b in bins if b]


def _row_candidates(sizes: list[int], *, capacity: int, multiple: int, most: int = 32) -> list[int]:
    """Bin capacities to try for uniform rows, largest first: ``capacity`` down to the larger of the
    biggest pair and half of ``capacity``, in steps of ``multiple`` (coarser when that gives more than
    ``most``, which bounds the planning cost)."""
    low = max(max(sizes, default=1), capacity // 2)
    count = max((capacity - low) // multiple + 1, 1)
    stride = multiple * -(-count // most)
    return [capacity] + [c for c in range(_round_up(low, multiple), capacity, stride) if c >= low][::-1][:most - 1]


def _uniform_length(bins: list[list[int]], sizes: list[int], *, multiple: int, capacity: int) -> int:
    """One row length for all ``bins``: the fullest bin rounded up to ``multiple``, at most ``capacity``
    (which always holds a bin)."""
    content = max((sum(sizes[i] for i in b) for b in bins), default=0)
    return min(max(_round_up(content, multiple), multiple), max(capacity, content))


def plan_packing(
    pair_lengths: Sequence[Sequence[int]] | np.ndarray,
    *,
    capacity: int,
    context_parallel_size: int = 1,
    fixed_length: Optional[int] = None,
    pad_to_multiple_of: int = 1,
    sample_ids: Optional[Sequence[int]] = None,
    sides: Sequence[str] = PAIR_SIDES,
    bin_multiple: int = 1,
    uniform_rows: bool = False,
    share_prompt: bool = False,
) -> PackingPlan:
    """Bins for the pairs of one window (``pair_lengths[i] = (prompt, chosen, rejected)`` of the pair
    at stream position ``i``). ``fixed_length`` / ``pad_to_multiple_of`` only shape the statistics;
    pass the collator's (:meth:`PackedPreferenceCollator.plan` does). ``sample_ids`` (dataset indices)
    name a pair in the error raised when it cannot fit a bin on its own. ``sides=("chosen",)`` packs
    single sequences (SFT on the chosen responses) instead of pairs; ``share_prompt`` sizes pairs in the
    shared-prompt layout (:class:`PackedPreferenceCollator`).

    ``bin_multiple``: the number of micro-batches must be a multiple of it (the interleaved pipeline
    schedule wants whole groups of PP; empty ``padding_bins`` fill a group). ``uniform_rows``: all rows
    of the window get one length (``row_length``: pipeline stages without a shape exchange). Then the
    rows' length is chosen too: for bin capacities from ``capacity`` down (:func:`_row_candidates`),
    first-fit-decreasing, and the same number of bins filled emptiest first, and the plan that
    computes the fewest positions, (bins + padding bins) x its fullest bin rounded up, wins (ties: the
    larger capacity, first-fit first: fewer, fuller micro-batches)."""
    if bin_multiple < 1:
        raise ValueError(f"bin_multiple must be >= 1, got {bin_multiple}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if fixed_length is not None and fixed_length < capacity:
        raise ValueError(f"fixed_length={fixed_length} is smaller than the bin capacity {capacity}")
    lengths = _as_lengths(pair_lengths)
    sizes = _pair_sizes(lengths, context_parallel_size=context_parallel_size, sides=sides, share_prompt=share_prompt)
    for i, size in enumerate(sizes):
        if size > capacity:
            name = f"pair at stream position {i}" if sample_ids is None else f"pair {sample_ids[i]} (stream position {i})"
            p, c, r = (int(x) for x in lengths[i])
            raise ValueError(
                f"{name} needs {size} tokens (prompt {p}, chosen {c}, rejected {r}; each sequence padded to a "
                f"multiple of 2 x CP = {2 * context_parallel_size}), more than one packed micro-batch holds "
                f"({capacity} = 2 x micro-batch size x seq length); raise --seq-length or prepare the data with a "
                "smaller --max-seq-length"
            )
    bins = _first_fit_decreasing(sizes, capacity=capacity)
    multiple = math.lcm(pad_to_multiple_of, 2 * context_parallel_size)
    padding = (-len(bins)) % bin_multiple
    row_length = None
    if uniform_rows and fixed_length is None:
        choices = []
        for cap in _row_candidates(sizes, capacity=capacity, multiple=multiple):
            ffd = bins if cap == capacity else _first_fit_decreasing(sizes, capacity=cap)
            pad = (-len(ffd)) % bin_multiple
            choices.append((ffd, pad))
            spread = _balanced(sizes, count=len(ffd) + pad, capacity=cap) if sizes else None
            if spread is not None:
                choices.append((spread, len(ffd) + pad - len(spread)))
        costs = [(len(b) + pad) * _uniform_length(b, sizes, multiple=multiple, capacity=capacity) for b, pad in choices]
        bins, padding = choices[costs.index(min(costs))]
        row_length = _uniform_length(bins, sizes, multiple=multiple, capacity=capacity)
        computed = (len(bins) + padding) * row_length
    else:
        computed = sum(_row_length(sum(sizes[i] for i in b), fixed_length=fixed_length, multiple=multiple) for b in bins)
        computed += padding * (fixed_length if fixed_length is not None else multiple)
    return PackingPlan(
        bins=tuple(tuple(b) for b in bins),
        capacity=capacity,
        real_tokens=int(sum((lengths[:, 0] + lengths[:, 1 + PAIR_SIDES.index(side)]).sum() for side in sides)),
        padded_tokens=sum(sizes),
        computed_tokens=computed,
        row_length=row_length,
        padding_bins=padding,
    )


@dataclass(frozen=True, kw_only=True)
class PackedPreferenceCollator:
    """One bin of pairs -> a packed :class:`Batch` (``[1, row]`` tensors, ``cu_seqlens``, ``sequence_ids``).

    Per sequence the tokens, ``labels`` and ``loss_mask`` are exactly the unpacked
    :class:`~megatron_tgdpo.data.collate.PreferenceCollator`'s row (up to padding): ``labels`` is the
    next token *of the same sequence*, so the last token of a sequence never predicts the next
    sequence's first token. ``position_ids`` restart at 0 in every segment (what megatron's thd RoPE
    computes). The row is ``fixed_length`` tokens when given (pipeline parallelism: one shape for
    every micro-batch), else the segments rounded up to ``lcm(pad_to_multiple_of, 2 * CP)``; the rest
    is a tail segment (``sequence_ids`` -1). With sequence parallelism the row divided by CP must also
    divide by TP: choose ``pad_to_multiple_of`` / ``fixed_length`` accordingly.
    """

    pad_id: int
    context_parallel_size: int = 1
    fixed_length: Optional[int] = None
    pad_to_multiple_of: int = 1
    #: which responses become sequences: pairs (chosen then rejected), or ("chosen",) for SFT
    sides: tuple[str, ...] = PAIR_SIDES
    #: each pair's prompt once per row, both responses attending to it (see "Shared prompts" above)
    share_prompt: bool = False

    def __post_init__(self) -> None:
        if self.context_parallel_size < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {self.context_parallel_size}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.share_prompt and tuple(self.sides) != PAIR_SIDES:
            raise ValueError(f"shared prompts are for pairs (sides {PAIR_SIDES}), got sides {tuple(self.sides)}")
        cp_chunks = 2 * self.context_parallel_size
        if self.fixed_length is not None and (self.fixed_length < 1 or self.fixed_length % cp_chunks):
            raise ValueError(
                f"fixed_length={self.fixed_length} must be a positive multiple of 2 * context_parallel_size "
                f"= {2 * self.context_parallel_size}"
            )

    @property
    def multiple(self) -> int:
        return math.lcm(self.pad_to_multiple_of, 2 * self.context_parallel_size)

    def plan(
        self,
        pair_lengths: Sequence[Sequence[int]] | np.ndarray,
        *,
        capacity: int,
        sample_ids: Optional[Sequence[int]] = None,
        bin_multiple: int = 1,
        uniform_rows: bool = False,
    ) -> PackingPlan:
        """:func:`plan_packing` with this collator's geometry (so the statistics are what it builds); with
        ``uniform_rows`` build the bins with ``dataclasses.replace(self, fixed_length=plan.row_length)``."""
        return plan_packing(
            pair_lengths, capacity=capacity, context_parallel_size=self.context_parallel_size,
            fixed_length=self.fixed_length, pad_to_multiple_of=self.pad_to_multiple_of, sample_ids=sample_ids,
            sides=self.sides, bin_multiple=bin_multiple, uniform_rows=uniform_rows,
            share_prompt=self.share_prompt,
        )

    def _row(self, content: int, items: Sequence[Mapping[str, Any]]) -> int:
        """The row length for ``content`` tokens of ``items`` (refused when over ``fixed_length``)."""
        row = _row_length(content, fixed_length=self.fixed_length, multiple=self.multiple)
        if content > row:
            names = [int(item.get("index", i)) for i, item in enumerate(items)]
            raise ValueError(
                f"pairs {names} need {content} tokens, more than fixed_length={self.fixed_length}; "
                f"pack with plan_packing(capacity <= fixed_length, share_prompt={self.share_prompt})"
            )
        return row

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        if not items:
            raise ValueError("cannot collate an empty bin")
        if self.share_prompt:
            return self._shared(items)
        prompts = [np.asarray(item["prompt"], dtype=np.int64) for item in items]
        # [chosen of pairs 0..P-1; rejected of pairs 0..P-1], as the rows layout orders its rows.
        sequences = [np.concatenate([p, np.asarray(item[side], dtype=np.int64)])
                     for side in self.sides for p, item in zip(prompts, items)]
        prompt_lengths = [len(p) for p in prompts] * len(self.sides)
        segments = [padded_length(len(s), context_parallel_size=self.context_parallel_size) for s in sequences]
        bounds = np.concatenate([[0], np.cumsum(segments)]).astype(np.int64)
        content = int(bounds[-1])
        row = self._row(content, items)
        if row > content:
            bounds = np.append(bounds, row)  # the tail segment
        tensors = self._fill(sequences, prompt_lengths, bounds, row)
        tensors["cu_seqlens"] = torch.from_numpy(bounds.astype(np.int32))
        tensors["sample_idx"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
        pairs = len(items) if self.sides == PAIR_SIDES else 0
        return Batch.from_packed(tensors, num_pairs=pairs, num_sequences=len(sequences),
                                 real_tokens=sum(len(s) for s in sequences))

    def _shared(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        """The shared-prompt layout of one bin: per pair (stream order) its prompt but the last token,
        then [last prompt token + chosen], then [last prompt token + rejected] (module docstring)."""
        pairs = len(items)
        segments: list[dict] = []  # tokens, labels, first loss position, first RoPE position, sequence, prefix
        for i, item in enumerate(items):
            prompt = np.asarray(item["prompt"], dtype=np.int64)
            shared, keep = shared_prompt_split(len(prompt), context_parallel_size=self.context_parallel_size)
            prefix = -1
            if shared:
                prefix = len(segments)
                segments.append(dict(tokens=prompt[:shared], labels=prompt[1 : shared + 1], loss_from=None,
                                     position=0, sequence=-1, prefix=-1, pad=False))
            for side, sequence in ((0, i), (1, pairs + i)):
                tokens = np.concatenate([prompt[shared:], np.asarray(item[PAIR_SIDES[side]], dtype=np.int64)])
                segments.append(dict(tokens=tokens, labels=tokens[1:], loss_from=max(keep - 1, 0),
                                     position=shared, sequence=sequence, prefix=prefix, pad=True))
        cp = self.context_parallel_size
        # The prompt segment is not padded: its responses attend to all of its keys.
        lengths = [padded_length(len(g["tokens"]), context_parallel_size=cp) if g["pad"] else len(g["tokens"])
                   for g in segments]
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        content = int(bounds[-1])
        row = self._row(content, items)
        prefix_of = [g["prefix"] for g in segments]
        if row > content:
            bounds = np.append(bounds, row)  # the tail segment
            prefix_of.append(-1)
        input_ids = np.full(row, self.pad_id, dtype=np.int64)
        labels = np.full(row, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(row, dtype=np.float32)
        position_ids = np.zeros(row, dtype=np.int64)
        sequence_ids = np.full(row, -1, dtype=np.int64)
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            first = segments[n]["position"] if n < len(segments) else 0
            position_ids[start:end] = first + np.arange(end - start)
        for n, g in enumerate(segments):
            start, length = int(bounds[n]), len(g["tokens"])
            input_ids[start : start + length] = g["tokens"]
            labels[start : start + len(g["labels"])] = g["labels"]
            if g["loss_from"] is not None:
                # Position t predicts token t + 1: the loss starts at the prompt's last token (or at
                # the response's first when there is no prompt), as in the unshared row.
                loss_mask[start + g["loss_from"] : start + length - 1] = 1.0
                sequence_ids[start : int(bounds[n + 1])] = g["sequence"]
        arrays = dict(input_ids=input_ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                      sequence_ids=sequence_ids)
        tensors = {key: torch.from_numpy(a).unsqueeze(0) for key, a in arrays.items()}
        tensors["cu_seqlens"] = torch.from_numpy(bounds.astype(np.int32))
        tensors["sample_idx"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
        real = sum(2 * len(item["prompt"]) + len(item["chosen"]) + len(item["rejected"]) for item in items)
        return Batch.from_packed(tensors, num_pairs=pairs, num_sequences=2 * pairs, real_tokens=real,
                                 prefix_of=tuple(prefix_of))

    def padding_batch(self) -> Batch:
        """A micro-batch of padding only (no sequence, nothing to learn): fills an interleaved pipeline
        schedule that needs a multiple of the pipeline size micro-batches. ``fixed_length`` tokens, or
        the smallest row this collator makes."""
        length = self.fixed_length if self.fixed_length is not None else self.multiple
        bounds = np.array([0, length], dtype=np.int64)
        tensors = self._fill([], [], bounds, length)
        tensors["cu_seqlens"] = torch.from_numpy(bounds.astype(np.int32))
        tensors["sample_idx"] = torch.zeros(0, dtype=torch.long)
        return Batch.from_packed(tensors, num_pairs=0, num_sequences=0)

    def _fill(
        self, sequences: list[np.ndarray], prompt_lengths: list[int], bounds: np.ndarray, row: int
    ) -> dict[str, torch.Tensor]:
        input_ids = np.full(row, self.pad_id, dtype=np.int64)
        labels = np.full(row, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(row, dtype=np.float32)
        position_ids = np.zeros(row, dtype=np.int64)
        sequence_ids = np.full(row, -1, dtype=np.int64)
        for start, end in zip(bounds[:-1], bounds[1:]):
            position_ids[start:end] = np.arange(end - start)
        for n, (tokens, prompt) in enumerate(zip(sequences, prompt_lengths)):
            start, end, length = int(bounds[n]), int(bounds[n + 1]), len(tokens)
            input_ids[start : start + length] = tokens
            # The next token of this sequence only: its last token (and its padding) get pad_id.
            labels[start : start + length - 1] = tokens[1:]
            # Position t predicts token t + 1: the response sits at prompt .. length - 1 (as unpacked).
            loss_mask[start + max(prompt - 1, 0) : start + length - 1] = 1.0
            sequence_ids[start:end] = n
        arrays = dict(input_ids=input_ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                      sequence_ids=sequence_ids)
        return {key: torch.from_numpy(a).unsqueeze(0) for key, a in arrays.items()}  # [1, row]


def shared_row_positions(bounds: Sequence[int], prefix_of: Sequence[int]) -> np.ndarray:
    """``[row]`` RoPE positions of a full shared-prompt row from its segments alone: a response segment
    continues its prompt segment's positions (which start at 0 and are not padded), every other segment
    starts at 0. The collator's ``position_ids`` of the same row, computable from host metadata that
    every context-parallel rank has."""
    positions = np.zeros(int(bounds[-1]), dtype=np.int64)
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        p = prefix_of[n] if n < len(prefix_of) else -1
        first = bounds[p + 1] - bounds[p] if p >= 0 else 0
        positions[start:end] = first + np.arange(end - start)
    return positions


def packed_seq_params_for(batch: Batch):
    """megatron-core ``PackedSeqParams`` (thd) for a packed batch, None for the rows layout: pass it as
    ``model(..., packed_seq_params=...)`` on every pipeline stage (each computes its own RoPE).

    ``cu_seqlens`` are the full row's (also for a CP slice: megatron and our attention divide each
    segment by CP themselves) and must be on the model's device. ``max_seqlen`` is the longest segment,
    a host int (megatron sizes the RoPE table with it and caches by it); it must not be the row length
    when there are several segments, or megatron's thd RoPE takes the freqs as whole-row positions and
    stops restarting per sequence (``rope_utils._apply_rotary_pos_emb_thd``, "CASE 1").

    The object is a :class:`~megatron_tgdpo.data.packed_params.RowSeqParams`: it also carries the bounds
    as host ints and, for a shared-prompt row, which segment each one attends to besides itself and
    the RoPE position of every row position (``models/rope_positions.py`` applies them)."""
    if not batch.packed:
        return None
    from megatron_tgdpo.data.packed_params import RowSeqParams

    bounds = batch.segment_bounds()
    segments = list(zip(bounds[:-1], bounds[1:]))
    longest = max(b - a for a, b in segments)
    prefix_of = batch.prefix_of or ()
    rope_positions = None
    cu = batch["cu_seqlens"]
    rope_cu = cu
    if any(p >= 0 for p in prefix_of):
        # A response's keys are its prompt's and its own: the longest such span bounds the positions.
        longest = max([longest] + [b - a + segments[p][1] - segments[p][0]
                                   for (a, b), p in zip(segments, prefix_of) if p >= 0])
        if batch.cp_slice is None:
            # megatron's thd RoPE splits q and k by the padded bounds. Unsplit, a shared-prompt row gives
            # it the row as one span: the table it gets has one entry per row position, so the split
            # would only cost a device-to-host read per segment and layer. The attention reads ``bounds``.
            rope_positions = batch["position_ids"].reshape(-1)
            rope_cu = cu.new_tensor([0, bounds[-1]])
        else:
            # A context-parallel slice holds only its own positions; megatron's thd RoPE takes this
            # rank's chunks of every segment from a table of the full row's positions.
            rope_positions = torch.from_numpy(shared_row_positions(bounds, prefix_of)).to(cu.device)
    return RowSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=rope_cu,
        cu_seqlens_kv_padded=rope_cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        bounds=tuple(bounds),
        prefix_of=tuple(prefix_of),
        rope_positions=rope_positions,
    )
