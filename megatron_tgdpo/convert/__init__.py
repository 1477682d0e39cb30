"""Hugging Face Llama <-> megatron-core checkpoints, streaming (a few tensors in memory, not the model).

API::

    hf_config_to_arch(config_dict) -> LlamaArch          # raises ConversionError if unsupported
    arch_to_hf_config(arch) -> dict
    hf_to_megatron(hf_dir, out_dir)                      # -> our converted format (see converted.py)
    megatron_to_hf(ckpt, out_dir, *, hf_config=None)     # converted or torch_dist (any TP/PP) -> HF
    is_hf_directory(path) / is_converted_directory(path)
    load_into_model(path, chunks)                        # HF dir or converted -> chunks at any TP/PP
    checkpoint_arch(path) -> LlamaArch                   # arch of an HF / converted directory

Formats, the name mapping and costs are documented in ``docs/checkpoints.md``. Nothing here imports
``transformers``; megatron-core is imported only by :func:`load_into_model`.
"""
from megatron_tgdpo.convert.converted import is_converted_directory
from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.hf_config import arch_to_hf_config, hf_config_to_arch, read_hf_config
from megatron_tgdpo.convert.hf_source import is_hf_directory
from megatron_tgdpo.convert.hf_to_megatron import hf_to_megatron
from megatron_tgdpo.convert.loader import checkpoint_arch, load_into_model
from megatron_tgdpo.convert.megatron_to_hf import megatron_to_hf

__all__ = [
    "ConversionError",
    "arch_to_hf_config",
    "checkpoint_arch",
    "hf_config_to_arch",
    "hf_to_megatron",
    "is_converted_directory",
    "is_hf_directory",
    "load_into_model",
    "megatron_to_hf",
    "read_hf_config",
]
