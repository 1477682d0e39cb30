"""Write a random Llama checkpoint in Hugging Face layout without ``transformers`` (tests, benchmarks).

Tensors are generated and written one at a time, so the checkpoint can be much larger than memory.
Names and shapes come from :mod:`.layout`; the parity test checks that table against ``transformers``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_tgdpo.convert.files import write_json
from megatron_tgdpo.convert.hf_config import arch_to_hf_config
from megatron_tgdpo.convert.layout import hf_shapes
from megatron_tgdpo.convert.megatron_to_hf import plan_shards
from megatron_tgdpo.convert.safetensors_io import HF_INDEX, SafetensorsWriter, tensor_bytes
from megatron_tgdpo.models.llama import LlamaArch


def write_synthetic_hf(
    out_dir: str | Path,
    arch: LlamaArch,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: Optional[int] = None,
    config: Optional[dict] = None,
) -> Path:
    """Random weights for ``arch`` as ``model-*.safetensors`` + index + ``config.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(arch)
    sizes = {name: tensor_bytes(shape, dtype) for name, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_size or sum(sizes.values()))
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s, names in enumerate(shards, start=1):
        file = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(out / file, [(n, dtype, shapes[n]) for n in names]) as writer:
            for name in names:
                shape = shapes[name]
                if len(shape) == 1:  # norm weights around 1, so swapped norms are visible
                    value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
                else:
                    value = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
                writer.write(name, [value.to(dtype)])
                weight_map[name] = file
    write_json(out / HF_INDEX, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    dtype_name = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", config or arch_to_hf_config(arch, dtype=dtype_name))
    return out
