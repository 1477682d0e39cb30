"""Between a full (unsharded, all layers) megatron-core GPT state dict and this rank's shards.

The *full* layout uses megatron-core parameter names with global layer numbers
(``decoder.layers.{global}.…``) and TP=1 tensors. Each TP-sharded parameter carries megatron's
``partition_dim`` / ``partition_stride`` attributes; a stride of 2 (the SwiGLU ``linear_fc1``) means the
full tensor is ``[gate; up]`` and rank r holds ``[gate_r; up_r]``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def shard_tensor(full: torch.Tensor, *, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of ``full`` (TP split along ``dim`` with megatron's partition stride)."""
    if size == 1:
        return full
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {size}x{stride} parts")
    pieces = full.chunk(size * stride, dim=dim)
    return torch.cat([pieces[s * size + rank] for s in range(stride)], dim=dim)


def gather_shards(shards: list[torch.Tensor], *, dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's shard in rank order."""
    size = len(shards)
    if size == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


def layer_offset(config, *, vp_stage: int | None = None) -> int:
    """Global index of this stage's first transformer layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        return get_transformer_layer_offset(config, vp_stage=vp_stage)
    except TypeError:  # older signature
        return get_transformer_layer_offset(config)


def to_global_name(name: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name, count=1)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside megatron's wrappers (DDP, Float16Module keep it in ``.module``)."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`unwrap`, and a clear error when what is inside is not a megatron-core ``GPTModel``."""
    gpt = unwrap(model)
    if not hasattr(gpt, "decoder") or not hasattr(gpt, "post_process"):
        raise TypeError(f"expected a megatron-core GPTModel (possibly DDP-wrapped), got {type(gpt).__name__}")
    return gpt


def load_full_state_dict(chunks: list[torch.nn.Module], full: Mapping[str, torch.Tensor]) -> None:
    """Copy the matching shards of a full state dict into this rank's model chunks."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for vp, chunk in enumerate(chunks):
        offset = layer_offset(chunk.config, vp_stage=vp if len(chunks) > 1 else None)
        missing = []
        for name, param in chunk.named_parameters():
            key = to_global_name(name, offset)
            if key not in full and key == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
                key = "embedding.word_embeddings.weight"  # tied: the last PP stage holds a copy
            if key not in full:
                missing.append(key)
                continue
            value = full[key]
            if getattr(param, "tensor_model_parallel", False):
                value = shard_tensor(
                    value, dim=param.partition_dim, stride=getattr(param, "partition_stride", 1), rank=rank, size=size
                )
            if value.shape != param.shape:
                raise ValueError(f"{key}: checkpoint shard shape {tuple(value.shape)} != model {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)
        if missing:
            raise KeyError(f"full state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")


def local_full_names(chunks: list[torch.nn.Module]) -> dict[str, tuple[torch.nn.Parameter, int, int]]:
    """Global name -> (local parameter, partition dim or -1, stride) for this rank's chunks."""
    out = {}
    for vp, chunk in enumerate(chunks):
        offset = layer_offset(chunk.config, vp_stage=vp if len(chunks) > 1 else None)
        for name, param in chunk.named_parameters():
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else -1
            out[to_global_name(name, offset)] = (param, dim, getattr(param, "partition_stride", 1))
    return out


def seeded_init(chunks: list[torch.nn.Module], *, seed: int, std: float) -> None:
    """Initialise every parameter from a generator keyed by (seed, global parameter name).

    megatron-core's own initialisation draws from one RNG stream in build order, so the weights
    depend on the parallel layout (a PP stage builds only its layers). Drawing each *full* tensor
    from its own keyed generator and then taking this rank's shard gives the same model at every
    TP/PP/CP layout, which is what makes from-scratch runs comparable across layouts. Norm weights
    are ones; output projections (``linear_proj``, ``linear_fc2``) use megatron's scaled std.
    """
    import zlib

    from megatron.core import parallel_state as ps

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    num_layers = chunks[0].config.num_layers
    for name, (param, dim, stride) in local_full_names(chunks).items():
        if param.dim() == 1:
            full = torch.ones(param.shape[0], dtype=torch.float32)
        else:
            shape = list(param.shape)
            if dim >= 0:
                shape[dim] *= size
            scaled = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            full = torch.randn(shape, generator=gen) * (std / (2 * num_layers) ** 0.5 if scaled else std)
        if dim >= 0:
            full = shard_tensor(full, dim=dim, stride=stride, rank=rank, size=size)
        with torch.no_grad():
            param.copy_(full.to(param.dtype))
