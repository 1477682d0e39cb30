"""Where a trained model came from: recorded in every training checkpoint, used by ``megatron-to-hf``.

An export must behave like the model that went in: same ``config.json`` (token ids, anything we do not
model), same tokenizer and chat template, same ``generation_config.json``. A torch_dist checkpoint holds
only weights, so the trainer computes this record once at start (:func:`run_origin`) and every save
puts it in ``tgdpo_checkpoint.json``::

    "hf_config": {...}                 # the start model's config.json (null: a preset / seeded model)
    "model_name": "Llama-3.2-1B"       # its own name: config.json's _name_or_path, else its directory
    "origin": {
      "format_version": 1,
      "model": "/models/Llama-3.2-1B", # the Hugging Face directory the config came from
      "generation_config": {...},      # its generation_config.json (null when it has none)
      "tokenizer": {"path": "/models/Llama-3.2-1B", "file": "tokenizer.json", "content_sha256": "..."}
    }

Which model: ``--load`` when it names a model directory (the policy starts there), else the lineage a
``--load`` training checkpoint records (a resumed run), else ``--ref-load`` (a Hugging Face or converted
directory, or a checkpoint whose record is carried over, e.g. TGDPO after DPO). The tokenizer is the
run's own (the one its data set was prepared with).

**Tokenizer: recorded by path and content hash, not copied.** The data set already depends on the same
tokenizer by absolute path and :func:`~megatron_tgdpo.data.tokenizer.tokenizer_content_hash`, so a
run cannot start without it; copying it would put ~10-20 MB (Llama-3's tokenizer.json is 9 MB) into
every ``iter_*`` directory, before its integrity manifest is written. The hash makes a moved or edited
tokenizer an explicit error at export (with the remedy ``--tokenizer-dir``), never a silent mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from megatron_tgdpo.convert.converted import is_converted_directory
from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.files import tokenizer_files
from megatron_tgdpo.convert.hf_config import read_hf_config
from megatron_tgdpo.convert.hf_source import is_hf_directory
from megatron_tgdpo.data.gguf_tokenizer import gguf_tokenizer_dir, is_gguf_file

__all__ = [
    "GENERATION_CONFIG",
    "ORIGIN_VERSION",
    "checked_tokenizer_dir",
    "model_name",
    "run_origin",
    "tokenizer_record",
]

ORIGIN_VERSION = 1
GENERATION_CONFIG = "generation_config.json"


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: unreadable ({exc})") from exc
    return value if isinstance(value, dict) else None


def model_name(config: Optional[dict], fallback: str) -> str:
    """A model's own name: the last part of config.json's ``_name_or_path``, else ``fallback``."""
    named = str((config or {}).get("_name_or_path") or "").rstrip("/").split("/")[-1]
    return named or fallback


def tokenizer_record(tokenizer: str | os.PathLike) -> dict:
    """``{"path", "file", "content_sha256"}`` of a tokenizer file or a directory holding one."""
    from megatron_tgdpo.data.tokenizer import tokenizer_content_hash

    path = Path(os.path.abspath(tokenizer))  # not resolve(): a hub-cache snapshot's files are symlinks to blobs
    if is_gguf_file(path):  # the files rebuilt from a GGUF file's metadata (what an export copies)
        path = gguf_tokenizer_dir(path)
    if path.is_dir():
        file = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)
        if file is None:
            raise ConversionError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    else:
        file = path
    return {"path": str(file.parent), "file": file.name, "content_sha256": tokenizer_content_hash(file)}


def _directory_origin(path: Path) -> Optional[dict]:
    """The record of a Hugging Face or converted model directory (None for anything else)."""
    if is_converted_directory(path):
        from megatron_tgdpo.convert.converted import read_metadata

        meta = read_metadata(path)
        config, source = meta.get("hf_config"), str(meta.get("source") or os.path.abspath(path))
    elif is_hf_directory(path):
        config, source = read_hf_config(path), os.path.abspath(path)
    elif is_gguf_file(path):
        from megatron_tgdpo.convert.gguf_source import GGUFModel

        model = GGUFModel(path)
        config, source = model.hf_config(), os.path.abspath(path)
        return {"hf_config": config, "model_name": path.stem,
                "origin": {"format_version": ORIGIN_VERSION, "model": source,
                           "generation_config": model.generation_config()}}
    else:
        return None
    return {
        "hf_config": config,
        "model_name": model_name(config, Path(source).name),
        "origin": {"format_version": ORIGIN_VERSION, "model": source,
                   "generation_config": _read_json(path / GENERATION_CONFIG)},
    }


def _checkpoint_origin(path: Path) -> Optional[dict]:
    """What a training checkpoint recorded (its lineage); None when it records none or is unusable."""
    from megatron_tgdpo import checkpointing

    if not (checkpointing.is_iteration_dir(path) or checkpointing.iteration_dirs(path)):
        return None
    try:
        meta = checkpointing.read_metadata(checkpointing.resolve(path))
    except checkpointing.CheckpointError:
        return None  # the loader reports it, with the reason
    if not isinstance(meta.get("origin"), dict):
        return None  # written before checkpoints recorded their origin
    out = {"hf_config": meta.get("hf_config"), "origin": dict(meta["origin"])}
    if meta.get("model_name"):
        out["model_name"] = meta["model_name"]
    return out


def run_origin(*, load: Optional[str], ref_load: Optional[str], tokenizer: Optional[str]) -> dict:
    """The entries a training checkpoint records about its origin (see the module docstring); merged
    into the checkpoint state. ``tokenizer``: the run's tokenizer file or directory."""
    found: Optional[dict] = None
    if load is not None and Path(load).exists():
        found = _directory_origin(Path(load)) or _checkpoint_origin(Path(load))
    if found is None and ref_load is not None and Path(ref_load).exists():
        found = _directory_origin(Path(ref_load)) or _checkpoint_origin(Path(ref_load))
    state: dict[str, Any] = found or {"hf_config": None, "origin": {"format_version": ORIGIN_VERSION, "model": None,
                                                                    "generation_config": None}}
    state["origin"] = dict(state["origin"], tokenizer=tokenizer_record(tokenizer) if tokenizer else None)
    return state


def _short(digest: Any) -> str:
    return f"{str(digest)[:16]}..."


def checked_tokenizer_dir(recorded: Optional[dict], *, given: Optional[Path], where: str,
                          say=lambda message: None) -> Optional[Path]:
    """The directory to copy tokenizer files from: ``given`` (``--tokenizer-dir``) if any, else the one
    ``recorded`` in a checkpoint's origin, which must still hold the same tokenizer (same content hash).

    Raises :class:`ConversionError` when the recorded tokenizer has moved or changed; a ``given``
    directory whose tokenizer differs from the recorded one is used, with a warning."""
    from megatron_tgdpo.data.errors import TokenizerError
    from megatron_tgdpo.data.tokenizer import tokenizer_content_hash

    expected = (recorded or {}).get("content_sha256")
    if given is not None:
        given = Path(given)
        if not given.is_dir():
            raise ConversionError(f"--tokenizer-dir {given}: no such directory")
        if expected:
            try:
                actual = tokenizer_content_hash(given)
            except TokenizerError:
                actual = None
            if actual != expected:
                say(f"warning: --tokenizer-dir {given} is not the tokenizer this model was trained with "
                    f"(content sha256 {_short(actual) if actual else 'none: no tokenizer.json/.model'}, the "
                    f"checkpoint records {_short(expected)}); copying it as asked")
        return given
    if not recorded or not recorded.get("path"):
        return None
    directory = Path(recorded["path"])
    file = directory / str(recorded.get("file") or "")
    if not file.is_file():
        raise ConversionError(
            f"the tokenizer recorded in {where} at {file} has moved or been deleted; pass --tokenizer-dir <dir> "
            f"with the tokenizer the model was trained with (content sha256 {_short(expected)})")
    actual = tokenizer_content_hash(file)
    if expected and actual != expected:
        raise ConversionError(
            f"the tokenizer at {directory} changed since training: its files' sha256 is {_short(actual)}, {where} "
            f"records {_short(expected)}; restore it, or pass --tokenizer-dir <dir> with the original tokenizer")
    if not tokenizer_files(directory):
        return None
    return directory
