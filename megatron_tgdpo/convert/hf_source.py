"""A Hugging Face Llama directory as lazy megatron-named tensors (for conversion and direct loading)."""
from __future__ import annotations

from pathlib import Path

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.hf_config import hf_config_to_arch, read_hf_config
from megatron_tgdpo.convert.layout import check_hf_names, hf_shapes, megatron_from_hf
from megatron_tgdpo.convert.safetensors_io import HF_INDEX, HF_SINGLE, hf_weight_map, open_views
from megatron_tgdpo.convert.views import ConcatRows, TensorView
from megatron_tgdpo.data.gguf_tokenizer import is_gguf_file
from megatron_tgdpo.models.llama import LlamaArch

_WEIGHT_GLOBS = (HF_INDEX, HF_SINGLE, "*.safetensors", "pytorch_model*.bin")


def is_hf_directory(path: str | Path) -> bool:
    """A directory with ``config.json`` and Hugging Face weight files (not our converted format)."""
    from megatron_tgdpo.convert.converted import METADATA

    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()) or (path / METADATA).exists():
        return False
    return any(any(path.glob(pattern)) for pattern in _WEIGHT_GLOBS)


def open_hf(hf_dir: str | Path) -> tuple[dict, LlamaArch, dict[str, TensorView]]:
    """(config.json, arch, HF name -> view), with every expected tensor present at its expected shape."""
    hf_dir = Path(hf_dir)
    if is_gguf_file(hf_dir):  # a llama.cpp file reads as the same HF-named tensors
        from megatron_tgdpo.convert.gguf_source import open_gguf

        return open_gguf(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: no such directory")
    config = read_hf_config(hf_dir)
    try:
        arch = hf_config_to_arch(config)
    except ConversionError as exc:
        raise ConversionError(f"{hf_dir / 'config.json'}: {exc}") from None
    views = open_views(hf_weight_map(hf_dir))
    check_hf_names(arch, set(views), where=str(hf_dir))
    wrong = [
        f"{name}: {views[name].shape} in {views[name].path.name}, expected {shape}"
        for name, shape in hf_shapes(arch).items()
        if views[name].shape != shape
    ]
    if wrong:
        raise ConversionError(
            f"{hf_dir}: tensor shapes do not match config.json (hidden_size, num_key_value_heads, "
            "intermediate_size, vocab_size):\n  " + "\n  ".join(wrong[:8])
        )
    return config, arch, views


def megatron_views_from_hf(arch: LlamaArch, hf_views: dict[str, TensorView]) -> dict[str, TensorView]:
    """megatron full name -> the concatenation of HF row ranges that makes it (nothing is read yet)."""
    return {
        name: ConcatRows([(hf_views[r.name], r.start, r.stop) for r in rows], label=f"{name} (from HF)")
        for name, rows in megatron_from_hf(arch).items()
    }
