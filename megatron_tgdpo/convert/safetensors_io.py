"""safetensors files: the tensors of a Hugging Face directory (index or single file), and a writer
that streams a file tensor by tensor.

Why our own writer: ``safetensors.torch.save_file`` takes a dict of resident tensors, so a 5 GB shard
(or a megatron layer) would have to sit in memory at once. The format is a little-endian u64 header
length, a JSON header (name -> dtype, shape, byte offsets), then the raw bytes in offset order. All of
it is known before any data is read, so we write the header first and append each tensor as it is
produced, block by block. Files are read back with the ``safetensors`` library (tests check that).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.views import SafetensorsView

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * element_size(dtype)


# ----------------------------------------------------------------------------------------------
# reading a Hugging Face directory
# ----------------------------------------------------------------------------------------------


def hf_weight_map(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index}: unreadable index ({exc})") from exc
        files = {name: hf_dir / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise ConversionError(
                f"{index} names shard files that are missing from {hf_dir}: {', '.join(missing)} "
                "(incomplete download or copy?)"
            )
        return files
    single = hf_dir / HF_SINGLE
    if single.is_file():
        return {name: single for name in _file_keys(single)}
    if list(hf_dir.glob("pytorch_model*.bin")) or list(hf_dir.glob("*.pt")):
        raise ConversionError(
            f"{hf_dir}: only PyTorch .bin weights found; re-save them as safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ConversionError(f"{hf_dir}: no {HF_INDEX} or {HF_SINGLE}; not a Hugging Face safetensors checkpoint")


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc


def open_views(weight_map: dict[str, Path]) -> dict[str, SafetensorsView]:
    """A lazy view per tensor, with shape and dtype read from the file headers (no data is read)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in weight_map.items():
        by_file.setdefault(path, []).append(name)
    views = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as fh:
                present = set(fh.keys())
                for name in names:
                    if name not in present:
                        raise ConversionError(f"{path}: lacks tensor {name!r}, which the index places in it")
                    part = fh.get_slice(name)
                    dtype = DTYPES.get(part.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{name} in {path}: unsupported dtype {part.get_dtype()}")
                    views[name] = SafetensorsView(path, name, part.get_shape(), dtype)
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc
    return views


# ----------------------------------------------------------------------------------------------
# streaming writer
# ----------------------------------------------------------------------------------------------


class SafetensorsWriter:
    """Write one ``.safetensors`` file whose tensors (name, dtype, shape) are declared up front and
    whose data then arrives tensor by tensor, in declaration order, in any number of row blocks."""

    def __init__(
        self,
        path: Path,
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        *,
        metadata: Optional[dict[str, str]] = None,
    ):
        self.path = Path(path)
        self.entries = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self.entries:
            if dtype not in DTYPE_NAMES:
                raise ConversionError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = tensor_bytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps data 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._fh = None

    def __enter__(self) -> "SafetensorsWriter":
        self._fh = open(self.path, "wb")
        self._fh.write(self._header)
        return self

    def write(self, name: str, blocks: Iterable[torch.Tensor]) -> int:
        """Append tensor ``name`` (the next declared one) from its consecutive row blocks; returns bytes."""
        if self._next >= len(self.entries) or self.entries[self._next][0] != name:
            expected = self.entries[self._next][0] if self._next < len(self.entries) else "nothing"
            raise ConversionError(f"{self.path}: wrote {name!r} where {expected!r} was declared")
        _, dtype, shape = self.entries[self._next]
        want, written = tensor_bytes(shape, dtype), 0
        for block in blocks:
            if block.dtype != dtype:
                raise ConversionError(f"{name}: block dtype {block.dtype} != declared {dtype}")
            block = block.detach().contiguous().reshape(-1)
            if block.numel():
                self._fh.write(memoryview(block.view(torch.uint8).numpy()))
            written += block.numel() * block.element_size()
        if written != want:
            raise ConversionError(f"{name}: produced {written} bytes, expected {want} for shape {shape} {dtype}")
        self._next += 1
        return written

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._next != len(self.entries):
                    raise ConversionError(f"{self.path}: only {self._next} of {len(self.entries)} tensors written")
                self._fh.flush()
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
