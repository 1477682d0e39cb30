"""Open any checkpoint we export from as megatron-named lazy tensors plus its architecture.

Sources: our converted format, a Hugging Face directory, or a torch_dist checkpoint written by
:func:`megatron_tgdpo.checkpointing.save_checkpoint` (a save root or one ``iter_*`` directory, any TP/PP).
A torch_dist checkpoint holds no architecture of its own; it comes from ``hf_config``, else from the
``hf_config`` / ``arch`` entries of its ``tgdpo_checkpoint.json`` (the trainer records both, plus the
``origin``: generation config and tokenizer, see :mod:`.origin`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tgdpo.convert.converted import is_converted_directory, open_converted
from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.hf_config import arch_from_dict, hf_config_to_arch, read_hf_config
from megatron_tgdpo.convert.hf_source import is_hf_directory, megatron_views_from_hf, open_hf
from megatron_tgdpo.convert.views import TensorView
from megatron_tgdpo.data.gguf_tokenizer import is_gguf_file
from megatron_tgdpo.models.llama import LlamaArch


@dataclass
class MegatronSource:
    arch: LlamaArch
    views: dict[str, TensorView]  # megatron full name -> lazy tensor
    hf_config: Optional[dict]  # the config.json to publish with an export (None: derive from arch)
    tokenizer_dir: Optional[Path]  # where tokenizer files can be copied from
    label: str
    origin: Optional[dict] = None  # a torch_dist checkpoint's recorded origin (see .origin)


def arch_difference(a: LlamaArch, b: LlamaArch) -> list[str]:
    return [
        f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}"
        for f in dataclasses.fields(LlamaArch)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def _given_config(hf_config) -> tuple[Optional[dict], Optional[Path]]:
    """(config dict, directory to take tokenizer files from) for a dict, a config.json, a Hugging Face
    directory or a converted directory (whose metadata keeps the source config.json)."""
    if hf_config is None or isinstance(hf_config, dict):
        return hf_config, None
    path = Path(hf_config)
    if is_converted_directory(path):
        from megatron_tgdpo.convert.converted import read_metadata

        config = read_metadata(path).get("hf_config")
        if config is None:
            raise ConversionError(f"{path}: this converted checkpoint does not keep a config.json")
        return config, path
    return read_hf_config(path), (path if path.is_dir() else path.parent)


def _check_agree(arch: LlamaArch, config: dict, *, where: str) -> None:
    diff = arch_difference(arch, hf_config_to_arch(config))
    if diff:
        raise ConversionError(f"--hf-config does not describe {where}: " + "; ".join(diff))


def open_megatron_source(path: str | Path, *, hf_config=None) -> MegatronSource:
    """``hf_config`` (optional): a config dict, a ``config.json``, a Hugging Face or converted directory."""
    path = Path(path)
    given, given_dir = _given_config(hf_config)
    if is_converted_directory(path):
        meta, arch, views = open_converted(path)
        if given is not None:
            _check_agree(arch, given, where=str(path))
        return MegatronSource(arch, views, given or meta.get("hf_config"), given_dir or path, str(path))
    if is_gguf_file(path):
        from megatron_tgdpo.data.gguf_tokenizer import gguf_tokenizer_dir

        config, arch, hf_views = open_hf(path)
        if given is not None:
            _check_agree(arch, given, where=str(path))
        views = megatron_views_from_hf(arch, hf_views)
        return MegatronSource(arch, views, given or config, given_dir or gguf_tokenizer_dir(path), str(path))
    if is_hf_directory(path):
        config, arch, hf_views = open_hf(path)
        if given is not None:
            _check_agree(arch, given, where=str(path))
        views = megatron_views_from_hf(arch, hf_views)
        return MegatronSource(arch, views, given or config, given_dir or path, str(path))
    return _open_torch_dist(path, given, given_dir)


def _open_torch_dist(path: Path, given: Optional[dict], given_dir: Optional[Path]) -> MegatronSource:
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.convert.torch_dist import TorchDistCheckpoint, torch_dist_views

    try:
        ckpt_dir = checkpointing.resolve(path, verify="checksums")
        meta = checkpointing.read_metadata(ckpt_dir)
    except checkpointing.CheckpointError as exc:
        raise ConversionError(
            f"{exc} (not a Hugging Face directory, a converted checkpoint or a torch_dist checkpoint)"
        ) from None
    config = given if given is not None else meta.get("hf_config")
    recorded = arch_from_dict(meta["arch"]) if isinstance(meta.get("arch"), dict) else None
    if config is not None:
        arch, arch_source = hf_config_to_arch(config), ("--hf-config" if given is not None else f"{ckpt_dir} hf_config")
        if recorded is not None and arch_difference(arch, recorded):
            raise ConversionError(
                f"{arch_source} does not describe {ckpt_dir}: " + "; ".join(arch_difference(arch, recorded))
            )
    elif recorded is not None:
        arch, arch_source = recorded, f"{ckpt_dir} arch"
    else:
        raise ConversionError(
            f"{ckpt_dir}: the checkpoint does not record the model architecture; pass the model's "
            "config.json with --hf-config"
        )
    views = torch_dist_views(TorchDistCheckpoint(ckpt_dir), arch, arch_source=arch_source)
    origin = meta.get("origin") if isinstance(meta.get("origin"), dict) else None
    return MegatronSource(arch, views, config, given_dir, str(ckpt_dir), origin)
