"""The layout of a GGUF file (llama.cpp's model format): its metadata and where each tensor's bytes are.

The header is parsed here with :mod:`struct` over a memory map: ``gguf.GGUFReader`` builds one
numpy view per array element, which takes many seconds on a 49k-token vocabulary, and every rank
of a multi-rank job opens the file. Decoding the tensor bytes (dequantization) is left to the
``gguf`` package (:mod:`megatron_tgdpo.convert.gguf_source`).

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count
u64, the metadata (key string, value type u32, value), the tensor infos (name, dims u32 + u64 each
(innermost first), ggml type u32, offset u64 from the data start), then the data, aligned to
``general.alignment`` (32 by default).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFTensorInfo", "GGUFFormatError", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands (the message names the file)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (contiguous) dimension first
    ggml_type: int
    offset: int  # absolute byte offset in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """The row-major (torch / numpy) shape."""
        return tuple(reversed(self.dims))


class GGUFFile:
    """Metadata (``fields``) and tensor infos (``tensors``, by name) of a GGUF file; ``header_bytes``
    is the length of everything before the tensor data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                self._parse(buf)
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({exc})") from None

    def _parse(self, buf: mmap.mmap) -> None:
        if buf[:4] != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (no GGUF magic bytes)")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        pos = 24
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key, pos = _string(buf, pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            fields[key], pos = _value(buf, pos, kind)
        self.fields = fields
        infos = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims, pos = struct.unpack_from(f"<{n_dims}Q", buf, pos), pos + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), int(ggml_type), int(offset)))
        alignment = int(fields.get("general.alignment", 32))
        start = -(-pos // alignment) * alignment
        self.header_bytes = pos
        self.size = len(buf)
        self.tensors = {name: GGUFTensorInfo(name, dims, kind, start + off) for name, dims, kind, off in infos}


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos : pos + length]).decode("utf-8"), pos + length


def _value(buf: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALAR:
        fmt = _SCALAR[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown metadata value type {kind}")
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _NUMPY:  # numbers: one read, not one per element
        values = np.frombuffer(buf, dtype=_NUMPY[item], count=count, offset=pos)
        return values.tolist(), pos + values.nbytes
    out = []
    for _ in range(count):
        value, pos = _value(buf, pos, item)
        out.append(value)
    return out, pos
