"""Lazy tensors: read rows or columns of a stored tensor on demand, never a whole model.

A :class:`TensorView` is something with a shape and dtype that can produce any row range (dim 0) or
column range (dim 1) of itself. Stored tensors (a safetensors entry, a torch_dist region) are leaves;
:class:`ConcatRows` stacks row ranges of other views, which is all the HF <-> megatron mapping needs
(see :mod:`megatron_tgdpo.convert.layout`). Reading a TP shard therefore touches only that shard's rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from megatron_tgdpo.convert.errors import ConversionError

Range = Optional[tuple[int, int]]


class TensorView(ABC):
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str  # where it lives, for error messages

    @abstractmethod
    def read(self, *, rows: Range = None, cols: Range = None) -> torch.Tensor:
        """Rows ``[a, b)`` and/or columns ``[c, d)`` (dim 1) of the tensor, as a new CPU tensor."""

    def blocks(self) -> Iterator[torch.Tensor]:
        """The whole tensor as consecutive row blocks (for streaming writes); one block by default."""
        yield self.read()

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsView(TensorView):
    """One tensor of a ``.safetensors`` file, read with ``safe_open``/``get_slice``.

    The file is opened per read: the memory map (whose touched pages count as resident memory) is
    dropped right after, so streaming a large file never accumulates it.
    """

    def __init__(self, path: Path, key: str, shape: Sequence[int], dtype: torch.dtype):
        self.path, self.key, self.shape, self.dtype = Path(path), key, tuple(shape), dtype
        self.label = f"{key} in {self.path}"

    def read(self, *, rows: Range = None, cols: Range = None) -> torch.Tensor:
        from safetensors import safe_open

        if cols is not None and len(self.shape) != 2:
            raise ValueError(f"{self.label}: column read of a {len(self.shape)}-d tensor")
        with safe_open(str(self.path), framework="pt") as fh:
            if rows is None and cols is None:
                return fh.get_tensor(self.key)
            part = fh.get_slice(self.key)
            r = slice(*rows) if rows is not None else slice(None)
            return part[r] if cols is None else part[r, slice(*cols)]


class ConcatRows(TensorView):
    """Row ranges ``(view, start, stop)`` of other views, concatenated along dim 0."""

    def __init__(self, parts: Sequence[tuple[TensorView, int, int]], *, label: str):
        if not parts:
            raise ValueError(f"{label}: no parts")
        self.parts, self.label = list(parts), label
        dtypes = {view.dtype for view, _, _ in parts}
        if len(dtypes) != 1:
            raise ConversionError(f"{label}: its parts have different dtypes {sorted(map(str, dtypes))}")
        trailing = {view.shape[1:] for view, _, _ in parts}
        if len(trailing) != 1:
            raise ConversionError(f"{label}: its parts have different trailing shapes {sorted(trailing)}")
        self.dtype = dtypes.pop()
        self.shape = (sum(stop - start for _, start, stop in parts), *trailing.pop())

    def read(self, *, rows: Range = None, cols: Range = None) -> torch.Tensor:
        a, b = rows if rows is not None else (0, self.shape[0])
        out, cursor = [], 0
        for view, start, stop in self.parts:
            lo, hi = max(a, cursor), min(b, cursor + stop - start)
            if lo < hi:
                out.append(view.read(rows=(start + lo - cursor, start + hi - cursor), cols=cols))
            cursor += stop - start
        return out[0] if len(out) == 1 else torch.cat(out)

    def blocks(self) -> Iterator[torch.Tensor]:
        for view, start, stop in self.parts:
            yield view.read(rows=(start, stop))


def shard_ranges(size_along_dim: int, *, rank: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Index ranges of the full tensor that TP rank ``rank`` holds, in order (megatron's partition
    ``stride``: a stride-2 ``linear_fc1`` rank holds ``[gate_r; up_r]``); matches
    :func:`megatron_tgdpo.models.state_dict.shard_tensor`."""
    parts = size * stride
    if size_along_dim % parts:
        raise ConversionError(f"dimension of size {size_along_dim} does not split into {size}x{stride} parts")
    n = size_along_dim // parts
    return [((s * size + rank) * n, (s * size + rank + 1) * n) for s in range(stride)]


def read_shard(view: TensorView, *, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This TP rank's shard of ``view``, reading only the rows/columns it holds."""
    if dim < 0 or size == 1:
        return view.read()
    ranges = shard_ranges(view.shape[dim], rank=rank, size=size, stride=stride)
    if dim == 0:
        parts = [view.read(rows=r) for r in ranges]
    elif dim == 1:
        parts = [view.read(cols=r) for r in ranges]
    else:
        raise ConversionError(f"{view.label}: TP split along dim {dim} is not supported")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
