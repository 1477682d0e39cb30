"""Our "converted" format: megatron-named full (TP=1) tensors in safetensors, one file per group.

Layout::

    <dir>/
      tgdpo_converted.json        # format, format_version, arch, the source config.json, files
      embedding.safetensors       # embedding.word_embeddings.weight
      layer_00000.safetensors     # decoder.layers.0.* (6 tensors: 2 norms, qkv, proj, fc1, fc2)
      ...
      final.safetensors           # decoder.final_layernorm.weight (+ output_layer.weight if untied)
      tokenizer.json, ...         # copied from the source when present

Names and layouts are those of :mod:`megatron_tgdpo.models.state_dict` (global layer numbers, grouped
qkv rows, fc1 = [gate; up]). Any TP/PP reads its shards with ``get_slice`` (see :mod:`.loader`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.hf_config import arch_from_dict, arch_to_dict
from megatron_tgdpo.convert.layout import megatron_shapes
from megatron_tgdpo.convert.safetensors_io import open_views
from megatron_tgdpo.convert.views import TensorView
from megatron_tgdpo.models.llama import LlamaArch

METADATA = "tgdpo_converted.json"
FORMAT = "megatron_tgdpo.converted"
FORMAT_VERSION = 1


def is_converted_directory(path: str | Path) -> bool:
    return (Path(path) / METADATA).is_file()


def group_file(group: str) -> str:
    return f"{group}.safetensors"


def metadata(*, arch: LlamaArch, hf_config: Optional[dict], files: dict[str, list[str]], source: str) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch_to_dict(arch),
        "hf_config": hf_config,
        "files": files,
        "source": source,
    }


def read_metadata(path: str | Path) -> dict:
    file = Path(path) / METADATA
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: unreadable ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConversionError(
            f"{file}: format_version {meta['format_version']} is newer than this megatron_tgdpo reads "
            f"({FORMAT_VERSION}); upgrade megatron_tgdpo"
        )
    return meta


def open_converted(path: str | Path) -> tuple[dict, LlamaArch, dict[str, TensorView]]:
    """(metadata, arch, megatron name -> view), every tensor present at the arch's shape."""
    path = Path(path)
    meta = read_metadata(path)
    arch = arch_from_dict(meta["arch"])
    weight_map = {}
    for file, names in meta["files"].items():
        if not (path / file).is_file():
            raise ConversionError(f"{path}: {METADATA} lists {file}, which is missing (incomplete copy?)")
        weight_map.update({name: path / file for name in names})
    views = open_views(weight_map)
    expected = megatron_shapes(arch)
    missing = sorted(set(expected) - set(views))
    if missing:
        raise ConversionError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    wrong = [f"{n}: {views[n].shape} != {s}" for n, s in expected.items() if views[n].shape != s]
    if wrong:
        raise ConversionError(f"{path}: tensor shapes do not match its architecture:\n  " + "\n  ".join(wrong[:8]))
    return meta, arch, {name: views[name] for name in expected}
