"""The batch contract: what one micro-batch holds, where its sequences are, how a CP rank slices it.

Every consumer (losses, the log-prob cache, the precompute tool, the schedule's context-parallel
slicer, evaluation, SFT, rollouts) reads sequences through this type instead of assuming a row layout.

Two layouts, one contract:

* **rows** — one sequence per row, padded to a common length ``S``: tensors ``[R, S]``.
* **packed** — one row holding several sequences back to back (``[1, S]``), their boundaries in
  ``cu_seqlens`` (int32, ``[segments + 1]``, offsets into the row). Each segment is one sequence padded
  to what context parallelism needs; a final segment may be the row's tail padding (no sequence).
  ``sequence_ids`` says which sequence each position belongs to (-1 in the tail).

Sequences are numbered ``0..N-1``. With pairs (``num_pairs = P > 0``) sequence ``i < P`` is the chosen
response of pair ``i`` and sequence ``P + i`` its rejected response: the ``[chosen; rejected]``
convention, at the level of sequences. In the rows layout sequence ``n`` is row ``n``.

Keys (a ``Batch`` is a read-only mapping of its tensors):

==================  ==========  =============================================================
``input_ids``       per token   token ids
``labels``          per token   the next token of the same sequence (pad where there is none)
``loss_mask``       per token   1.0 where ``labels`` is a trained (response) token
``position_ids``    per token   position inside its own sequence (RoPE restarts per sequence)
``sequence_ids``    per token   packed only: sequence index, -1 on tail padding
``sample_idx``      per pair    dataset index of each pair (``[P]``), or of each sequence (``[N]``)
``cu_seqlens``      per segment packed only
==================  ==========  =============================================================

Further per-token tensors (cached log-probs, PPO advantages) are added with :meth:`Batch.with_per_token`
and travel through context-parallel slicing like the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Optional

import torch

__all__ = ["Batch", "PER_TOKEN_KEYS", "cp_chunk_positions", "cp_row_positions", "host_loss_positions"]

PER_TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def cp_chunk_positions(*, local_len: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Positions of one sequence (of length ``local_len * cp_size``) held by ``cp_rank``.

    megatron's load-balanced layout: the sequence is cut into ``2 * cp_size`` chunks and rank ``r``
    holds chunks ``r`` and ``2 * cp_size - 1 - r`` (so every rank gets the same causal-attention work)."""
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    chunk = local_len // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def cp_row_positions(segment_bounds: list[int], *, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Positions of a row held by ``cp_rank`` when the row is several segments (``segment_bounds`` are
    cumulative offsets, first 0, last the row length): each segment is split on its own, in order."""
    if cp_size == 1:
        return torch.arange(segment_bounds[-1] if segment_bounds else 0, device=device)
    parts = []
    for start, end in zip(segment_bounds[:-1], segment_bounds[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"a packed segment of {length} tokens is not divisible by 2 x CP = {2 * cp_size}; "
                             "the packer must pad every sequence to that multiple")
        parts.append(start + cp_chunk_positions(local_len=length // cp_size, cp_rank=cp_rank, cp_size=cp_size,
                                                device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def host_loss_positions(tensors: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """Flat indices of ``loss_mask``'s nonzero positions when the mask is on the host (collation), else
    None: on a GPU the count would cost a device sync, and every position is computed instead."""
    mask = tensors.get("loss_mask")
    if mask is None or mask.device.type != "cpu":
        return None
    return torch.nonzero(mask.reshape(-1)).reshape(-1)


@dataclass(frozen=True)
class Batch(Mapping[str, torch.Tensor]):
    """One micro-batch (see the module docstring for the layouts and keys)."""

    tensors: dict[str, torch.Tensor]
    per_token: tuple[str, ...] = PER_TOKEN_KEYS
    num_pairs: int = 0
    num_sequences: int = 0
    packed: bool = False
    #: tokens of the sequences themselves (no padding), counted on the host by whoever collated the batch
    real_tokens: int = 0
    #: packed: ``cu_seqlens`` as host ints (read without a device sync once the batch is on the GPU)
    bounds: Optional[tuple[int, ...]] = None
    #: shared-prompt rows: per segment, the segment whose keys it also attends to (its prompt), or -1
    prefix_of: Optional[tuple[int, ...]] = None
    #: set when this is one context-parallel rank's slice: (cp_rank, cp_size, full sequence length)
    cp_slice: Optional[tuple[int, int, int]] = field(default=None, compare=False)
    #: flat indices into ``[R * S]`` of the trained positions (``loss_mask`` nonzero), ascending; taken on
    #: the host where the batch is collated (:func:`host_loss_positions`), so that the LM head computes
    #: log-probs there only without a device sync. None where not known (a mask built on a device, a
    #: context-parallel slice): every position is then computed.
    loss_positions: Optional[torch.Tensor] = field(default=None, compare=False)

    # ---- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, tensors: Mapping[str, torch.Tensor], *, num_pairs: int = 0, real_tokens: int = 0) -> "Batch":
        """Rows layout: sequence ``n`` is row ``n`` (pairs: rows ``[chosen; rejected]``)."""
        rows = int(tensors["input_ids"].shape[0])
        if num_pairs and rows != 2 * num_pairs:
            raise ValueError(f"a pair batch in the rows layout has 2 x {num_pairs} rows, got {rows}")
        return cls(dict(tensors), num_pairs=num_pairs, num_sequences=rows, real_tokens=real_tokens,
                   loss_positions=host_loss_positions(tensors))

    @classmethod
    def from_packed(cls, tensors: Mapping[str, torch.Tensor], *, num_pairs: int, num_sequences: int,
                    real_tokens: int = 0, prefix_of: Optional[tuple[int, ...]] = None) -> "Batch":
        if tensors["input_ids"].shape[0] != 1:
            raise ValueError("a packed batch is one row of sequences")
        bounds = tuple(int(x) for x in tensors["cu_seqlens"].tolist())
        if prefix_of is not None and len(prefix_of) != len(bounds) - 1:
            raise ValueError(f"prefix_of names {len(prefix_of)} segments, cu_seqlens {len(bounds) - 1}")
        return cls(dict(tensors), per_token=PER_TOKEN_KEYS + ("sequence_ids",), num_pairs=num_pairs,
                   num_sequences=num_sequences, packed=True, real_tokens=real_tokens, bounds=bounds,
                   prefix_of=prefix_of, loss_positions=host_loss_positions(tensors))

    def with_per_token(self, **extra: torch.Tensor) -> "Batch":
        """A batch with more per-token tensors (shaped like ``input_ids``), sliced with it under CP."""
        shape = self.tensors["input_ids"].shape
        for key, value in extra.items():
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"per-token tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        keys = self.per_token + tuple(k for k in extra if k not in self.per_token)
        tensors = {**self.tensors, **extra}
        positions = host_loss_positions(tensors) if "loss_mask" in extra else self.loss_positions
        return replace(self, tensors=tensors, per_token=keys, loss_positions=positions)

    def to(self, device: torch.device, *, non_blocking: bool = True) -> "Batch":
        positions = self.loss_positions
        return replace(self, tensors={k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()},
                       loss_positions=None if positions is None else positions.to(device, non_blocking=non_blocking))

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        rows, seq = self.tensors["input_ids"].shape
        return int(rows), int(seq)

    @property
    def num_tokens(self) -> int:
        """Computed token positions (padding included)."""
        rows, seq = self.shape
        return rows * seq

    def segment_bounds(self) -> list[int]:
        """Packed: ``cu_seqlens`` as host ints (recorded when the batch was collated: no device sync)."""
        if self.bounds is None:
            raise ValueError("segment bounds exist for packed batches only")
        return list(self.bounds)

    # ---- per-sequence reductions ---------------------------------------------------------------
    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-sequence sums of a per-token tensor (already masked by the caller)."""
        if not self.packed:
            return values.sum(-1)
        ids = self.tensors["sequence_ids"].reshape(-1)
        flat = values.reshape(-1)
        keep = ids >= 0
        out = flat.new_zeros(self.num_sequences)
        return out.index_add(0, ids[keep], flat[keep])

    # ---- context parallelism -------------------------------------------------------------------
    def cp_positions(self, *, cp_rank: int, cp_size: int) -> torch.Tensor:
        """Column indices of the full batch held by ``cp_rank`` (same for every row)."""
        device = self.tensors["input_ids"].device
        seq = self.shape[1]
        if self.packed:
            return cp_row_positions(self.segment_bounds(), cp_rank=cp_rank, cp_size=cp_size, device=device)
        if seq % (2 * cp_size):
            raise ValueError(f"sequence length {seq} is not divisible by 2 x context-parallel size {2 * cp_size}; "
                             "pad batches to a multiple of 2*CP (--pad-to-multiple-of)")
        return cp_chunk_positions(local_len=seq // cp_size, cp_rank=cp_rank, cp_size=cp_size, device=device)

    def for_context_parallel(self, *, cp_rank: int, cp_size: int) -> "Batch":
        """This CP rank's positions of every per-token tensor; everything else unchanged."""
        if cp_size == 1:
            return self
        if self.cp_slice is not None:
            raise ValueError("batch is already a context-parallel slice")
        idx = self.cp_positions(cp_rank=cp_rank, cp_size=cp_size)
        tensors = {k: (v[:, idx] if k in self.per_token else v) for k, v in self.tensors.items()}
        return replace(self, tensors=tensors, cp_slice=(cp_rank, cp_size, self.shape[1]), loss_positions=None)

    def gather_context_parallel(self, local: torch.Tensor, *, group) -> torch.Tensor:
        """Inverse of :meth:`for_context_parallel` for one per-token tensor of this (sliced) batch:
        all-gathers the CP ranks' pieces into the full ``[R, S]`` layout."""
        import torch.distributed as dist

        if self.cp_slice is None:
            return local
        _, cp_size, seq = self.cp_slice
        parts = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        # Positions are computed from metadata that every CP rank shares (cu_seqlens or the length).
        if self.packed:
            bounds = self.segment_bounds()
            positions = [cp_row_positions(bounds, cp_rank=r, cp_size=cp_size, device=local.device) for r in range(cp_size)]
        else:
            positions = [cp_chunk_positions(local_len=seq // cp_size, cp_rank=r, cp_size=cp_size, device=local.device)
                         for r in range(cp_size)]
        full = local.new_zeros(local.shape[0], seq)
        for rank, part in enumerate(parts):
            full[:, positions[rank]] = part
        return full
