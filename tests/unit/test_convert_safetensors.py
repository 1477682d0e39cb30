"""The streaming safetensors writer produces files the ``safetensors`` library reads back exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_tgdpo.convert import ConversionError
from megatron_tgdpo.convert.safetensors_io import SafetensorsWriter


def test_written_blocks_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.bf16": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "a.f32": torch.randn(7, generator=g),
        "c.f16": torch.randn(3, 4, generator=g).half(),
        "d.i64": torch.arange(10),
    }
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [(n, t.dtype, t.shape) for n, t in tensors.items()]) as w:
        for n, t in tensors.items():
            w.write(n, list(t.split(2)))  # several row blocks per tensor
    back = load_file(path)
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert torch.equal(fh.get_slice("b.bf16")[2:4], tensors["b.bf16"][2:4])


def test_writer_refuses_wrong_order_short_data_and_missing_tensors(tmp_path):
    entries = [("x", torch.float32, (2, 2)), ("y", torch.float32, (3,))]
    with pytest.raises(ConversionError, match="wrote 'y' where 'x'"):
        with SafetensorsWriter(tmp_path / "a.safetensors", entries) as w:
            w.write("y", [torch.zeros(3)])
    with pytest.raises(ConversionError, match="expected 16"):
        with SafetensorsWriter(tmp_path / "b.safetensors", entries) as w:
            w.write("x", [torch.zeros(1, 2)])
    with pytest.raises(ConversionError, match="dtype"):
        with SafetensorsWriter(tmp_path / "c.safetensors", entries) as w:
            w.write("x", [torch.zeros(2, 2, dtype=torch.float64)])
    with pytest.raises(ConversionError, match="only 1 of 2"):
        with SafetensorsWriter(tmp_path / "d.safetensors", entries) as w:
            w.write("x", [torch.zeros(2, 2)])
